"""Stage `error_table`: e[i, c] and storage s[i, c] for every target x candidate config.

Rows live in DuckDB `quant_errors` under a table key (model, init, rank, Fisher,
settings). Missing rows are computed several matrices at a time, one torch thread each
(`per_matrix_threads.py`), and committed as each matrix finishes, so an interrupted run
redoes at most the matrices in flight. Methods that share an init (lqlora and
lqlora-uniform) share one table.
"""

import time

import pandas as pd
import torch

from lqlora_dagster.decompose.lq import LQSettings
from lqlora_dagster.error_table import ConfigError, exhaustive_errors
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.fast_error_table import FastSettings, fast_errors
from lqlora_dagster.methods import Method, get_method
from lqlora_dagster.models.targets import Target
from lqlora_dagster.models.weights import read_target_weights
from lqlora_dagster.per_matrix_threads import one_thread_per_matrix
from lqlora_dagster.pipeline.base_model import recorded_targets
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.handles import ErrorTableHandle, FisherHandle, ModelHandle, TableRef
from lqlora_dagster.pipeline.settings import ErrorTableSettings
from lqlora_dagster.quant.config import QuantConfig, storage_bits
from lqlora_dagster.store.keys import stable_key
from lqlora_dagster.store.schemas import QUANT_ERRORS

TABLE_VERSION = "5"  # 3: steps shared across b1; 4: table-based quantizer on the exhaustive path (as the decomposition stage); 5: one torch thread per matrix everywhere


def lq_settings(s: ErrorTableSettings) -> LQSettings:
    return LQSettings(rank=s.rank, svd=s.svd, max_iters=s.max_iters, rel_tol=s.rel_tol)


def fast_path(method: Method, s: ErrorTableSettings) -> FastSettings | None:
    """The fast path's settings, or None for one decomposition per config. It shares one
    LQ decomposition among sibling configs; LoftQ (5 fixed iterations over 3 configs) and
    the zero init (no iterations) gain nothing from it. Settings that cannot change the
    rows are normalised, so they do not change the table key either."""
    if not (s.fast and method.init == "lq"):
        return None
    return FastSettings(refine_steps=s.refine_steps, refine_max_b0=s.refine_max_b0 if s.refine_steps else 0)


def table_refs(model: ModelHandle, fisher: FisherHandle | None, s: ErrorTableSettings) -> list[TableRef]:
    refs = []
    for name in s.methods:
        method = get_method(name)
        rank = s.rank if method.has_lowrank_init else 0
        fisher_key = fisher.key if (method.fisher and fisher is not None) else None
        if method.fisher and fisher is None:
            raise LQLoRAInputError(f"method {name!r} needs Fisher diagonals, but none were computed")
        recipe = lq_settings(s) if method.has_lowrank_init else None
        fast = fast_path(method, s)
        recipe_key = (model.key, method.init, method.fisher, rank, recipe, fisher_key)
        key = stable_key(*recipe_key, fast, TABLE_VERSION)
        exact_key = stable_key(*recipe_key, None, TABLE_VERSION) if fast is not None else None
        configs = [c.name for c in method.candidate_configs(s.configs)]
        refs.append(TableRef(name, key, rank, fisher_key, configs, len(configs) * model.n_targets, exact_key))
    return refs


def check_rank_fits(model: ModelHandle, targets: list[Target], rank: int) -> None:
    """The low-rank part must be thinner than every target matrix."""
    if not targets:
        return
    thinnest = min(targets, key=lambda t: min(t.rows, t.cols))
    limit = min(thinnest.rows, thinnest.cols)
    if rank >= limit:
        raise LQLoRAInputError(
            f"rank {rank} is too large for model {model.model!r}: its thinnest target, {thinnest.name} "
            f"({thinnest.rows}x{thinnest.cols}), allows at most rank {limit - 1}; lower `rank`"
        )


def _done(ctx: StageContext, table_key: str) -> set[tuple[str, str]]:
    rows = ctx.warehouse.query("SELECT matrix, config FROM quant_errors WHERE table_key = ?", [table_key])
    return set(zip(rows["matrix"], rows["config"]))


def table_rows(
    ref: TableRef, method: Method, model: ModelHandle, target: Target, results: list[ConfigError]
) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "table_key": ref.table_key,
                "model": model.model,
                "init": method.init,
                "matrix": target.name,
                "config": r.config.name,
                "b": r.config.b,
                "b0": r.config.b0,
                "b1": r.config.b1,
                "block_size": r.config.B0,
                "group_size": r.config.B1,
                "rank": ref.rank,
                "fisher": method.fisher,
                "bits_per_param": storage_bits(target.numel, r.config) / target.numel,
                "storage_bits": storage_bits(target.numel, r.config),
                "numel": target.numel,
                "error": float(r.error),
                "iters": r.iters,
                "seconds": r.seconds,
            }
            for r in results
        ]
    )


def compute_table_rows(
    ctx: StageContext,
    model: ModelHandle,
    fisher: FisherHandle | None,
    s: ErrorTableSettings,
    matrices: list[str] | None = None,
    workers: int | None = None,
) -> int:
    """Compute the missing rows for `matrices` (default: all targets), `workers` matrices
    at a time on one torch thread each (default: the context's); returns how many rows
    were written. Safe to run concurrently on disjoint matrix sets."""
    all_targets = recorded_targets(ctx, model.model)
    if any(get_method(m).has_lowrank_init for m in s.methods):
        check_rank_fits(model, all_targets, s.rank)
    targets = [t for t in all_targets if matrices is None or t.name in set(matrices)]
    # methods with the same init share one table (qlora and qlora-ilp, lqlora and
    # lqlora-uniform): compute it once, for the union of their candidate configs
    refs: dict[str, TableRef] = {}
    wanted: dict[str, list[str]] = {}
    for ref in table_refs(model, fisher, s):
        refs.setdefault(ref.table_key, ref)
        wanted.setdefault(ref.table_key, [])
        wanted[ref.table_key] += [c for c in ref.configs if c not in wanted[ref.table_key]]
    todo = []
    for key, ref in refs.items():
        done = _done(ctx, key)
        for t in targets:
            missing = [c for c in wanted[key] if (t.name, c) not in done]
            if missing:
                todo.append((ref, t, missing))
    if not todo:
        return 0
    weights = read_target_weights(model.folder, sorted({t for _, t, _ in todo}, key=lambda t: t.name))
    fishers = fisher_tensors(
        ctx, model.model, fisher.key if fisher else None, {t.name for ref, t, _ in todo if ref.fisher_key}
    )
    settings = lq_settings(s)

    def errors_of(item: tuple[TableRef, Target, list[str]]) -> list[ConfigError]:
        ref, target, missing = item
        method = get_method(ref.method)
        W = weights[target.name].to(ctx.device)
        F = fishers[target.name].to(ctx.device) if ref.fisher_key else None
        configs = tuple(QuantConfig.parse(c) for c in missing)
        fast = fast_path(method, s)
        if fast is not None:
            return fast_errors(W, configs, method, settings, F, fast)
        return exhaustive_errors(W, configs, method, settings, F)

    workers = ctx.matrix_workers if workers is None else workers
    written = 0
    start = time.perf_counter()
    for i, ((ref, target, missing), results) in enumerate(one_thread_per_matrix(errors_of, todo, workers), 1):
        frame = QUANT_ERRORS.validate(table_rows(ref, get_method(ref.method), model, target, results))
        written += ctx.warehouse.upsert("quant_errors", frame, ["table_key", "matrix", "config"])
        ctx.log(
            f"error_table {ref.method}: {i}/{len(todo)} {target.name} ({len(missing)} configs) "
            f"{time.perf_counter() - start:.0f}s"
        )
    return written


def fisher_tensors(ctx: StageContext, model: str, fisher_key: str | None, names: set[str]) -> dict[str, torch.Tensor]:
    """The stored Fisher diagonals of the named targets ({} without a Fisher key)."""
    if not names or fisher_key is None:
        return {}
    art = ctx.store.get("fisher_diagonals", model, fisher_key)
    return ctx.store.load_tensors(art, keys=sorted(names))[0]


def table_chunks(ctx: StageContext, model: ModelHandle, n_chunks: int) -> list[list[str]]:
    """Target names split into at most `n_chunks` groups of whole, contiguous layers
    (matrices of one layer have the shapes of any other, so chunks cost the same)."""
    targets = recorded_targets(ctx, model.model)
    layers = sorted({t.layer for t in targets})
    n = max(1, min(n_chunks, len(layers)))
    groups = [layers[i * len(layers) // n : (i + 1) * len(layers) // n] for i in range(n)]
    return [[t.name for t in targets if t.layer in set(g)] for g in groups if g]


def table_handle(model: ModelHandle, fisher: FisherHandle | None, s: ErrorTableSettings) -> ErrorTableHandle:
    return ErrorTableHandle(model.model, model.key, s.rank, lq_settings(s).__dict__, table_refs(model, fisher, s))


def run_error_table(
    ctx: StageContext, model: ModelHandle, fisher: FisherHandle | None, s: ErrorTableSettings
) -> ErrorTableHandle:
    written = compute_table_rows(ctx, model, fisher, s)
    ctx.log(f"error_table: {written} new rows" if written else "error_table: all rows cached")
    return ErrorTableHandle(
        model.model, model.key, s.rank, lq_settings(s).__dict__, table_refs(model, fisher, s)
    )


def load_table(ctx: StageContext, ref: TableRef) -> pd.DataFrame:
    """The rows of one table restricted to its candidate configs (long form)."""
    frame = ctx.warehouse.query(
        "SELECT matrix, config, numel, storage_bits, error, bits_per_param "
        "FROM quant_errors WHERE table_key = ?",
        [ref.table_key],
    )
    return frame[frame["config"].isin(ref.configs)].reset_index(drop=True)
