"""Which tables a run needs, their keys, and their rows as frames.

A table is identified by (model, init, Fisher, rank, LQ settings, fast-path settings,
code version). Methods with the same init share one table (qlora and qlora-ilp, lqlora
and lqlora-uniform). A fast table also names its exact twin (`TableRef.exact_key`):
the key an exhaustive run of the same table has, where plan confirmation stores the
exact rows it computes, so both share them.

A method that allocates rank (`ranks` knob) has one table per rank. On the fast path
one nonzero rank is the base (`base_rank`: the listed rank nearest the `rank` knob):
its table is the single-rank table, key and rows, and the other nonzero ranks are
priced on its factors (`priced_on_rank`, part of their key); rank 0 rows are
quantization errors, exact and cheap.
"""

import dataclasses

import pandas as pd

from lqlora_dagster.decompose.inits import ConfigError
from lqlora_dagster.error_estimation.estimates import LOWER_RANK_STEPS, FastSettings
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.methods import Method, get_method
from lqlora_dagster.models.targets import Target
from lqlora_dagster.pipeline.handles import FisherHandle, ModelHandle, TableRef
from lqlora_dagster.pipeline.settings import ErrorTableSettings
from lqlora_dagster.quant.config import storage_bits
from lqlora_dagster.store.keys import stable_key

TABLE_VERSION = "6"  # 6: warm-started fits take no power iteration of their own


def fast_path(method: Method, s: ErrorTableSettings) -> FastSettings | None:
    """The fast path's settings, or None for exact rows only. Only an estimable init
    (LQ) gains from it; settings that cannot change the rows are normalised, so they
    do not change the table key either."""
    if not (s.fast and method.init.estimable):
        return None
    return FastSettings(refine_steps=s.refine_steps, refine_max_b0=s.refine_max_b0 if s.refine_steps else 0)


def table_refs(model: ModelHandle, fisher: FisherHandle | None, s: ErrorTableSettings) -> list[TableRef]:
    """One ref per (method, rank), the ranks of a method in increasing order."""
    refs = []
    for name in s.methods:
        method = get_method(name)
        if method.fisher and fisher is None:
            raise LQLoRAInputError(f"method {name!r} needs Fisher diagonals, but none were computed")
        fisher_key = fisher.key if method.fisher else None
        configs = [c.name for c in method.candidate_configs(s.configs)]
        ranks = s.ranks_for(method)
        for rank in ranks:
            lowrank = method.has_lowrank_init and rank > 0
            recipe = dataclasses.replace(s.lq(), rank=rank) if lowrank else None
            fast = fast_path(method, s) if lowrank else None
            base = base_rank(ranks, s.rank)
            priced_on = base if fast is not None and rank != base else None
            recipe_key = (model.key, method.init.name, method.fisher, rank, recipe, fisher_key)
            derived = () if priced_on is None else (("priced on rank", priced_on, LOWER_RANK_STEPS, "v2"),)
            key = stable_key(*recipe_key, fast, *derived, TABLE_VERSION)
            exact_key = stable_key(*recipe_key, None, TABLE_VERSION) if fast is not None else None
            refs.append(TableRef(name, key, rank, fisher_key, configs, len(configs) * model.n_targets, exact_key,
                                 priced_on))
    return refs


def base_rank(ranks: tuple[int, ...], rank: int) -> int:
    """The rank other ranks are priced on: the listed nonzero rank nearest `rank` (the
    lower on a tie), so the default lists reuse the single-rank table."""
    nonzero = [r for r in ranks if r > 0] or [rank]
    return min(nonzero, key=lambda r: (abs(r - rank), r))


def check_rank_fits(model: ModelHandle, targets: list[Target], rank: int) -> None:
    """The low-rank part must be thinner than every target matrix."""
    if not targets or rank == 0:
        return
    thinnest = min(targets, key=lambda t: min(t.rows, t.cols))
    limit = min(thinnest.rows, thinnest.cols)
    if rank >= limit:
        raise LQLoRAInputError(
            f"rank {rank} is too large for model {model.model!r}: its thinnest target, {thinnest.name} "
            f"({thinnest.rows}x{thinnest.cols}), allows at most rank {limit - 1}; lower `rank`"
        )


def table_frame(table_key: str, ref: TableRef, model: str, target: Target, results: list[ConfigError]) -> pd.DataFrame:
    """Rows of `quant_errors` for one matrix of one table."""
    method = get_method(ref.method)
    return pd.DataFrame(
        [
            {
                "table_key": table_key,
                "model": model,
                "init": method.init.name,
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


def table_chunks(targets: list[Target], n_chunks: int) -> list[list[str]]:
    """Target names split into at most `n_chunks` groups of whole, contiguous layers
    (matrices of one layer have the shapes of any other, so chunks cost the same)."""
    layers = sorted({t.layer for t in targets})
    n = max(1, min(n_chunks, len(layers)))
    groups = [layers[i * len(layers) // n : (i + 1) * len(layers) // n] for i in range(n)]
    return [[t.name for t in targets if t.layer in set(g)] for g in groups if g]
