"""The error table in the pipeline: the `error_table` asset's steps and the exact rows
plan confirmation asks for, both computed by `compute.compute_rows` and committed to
DuckDB `quant_errors` matrix by matrix."""

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable
from pathlib import Path

import pandas as pd
import torch

from lqlora_dagster.allocate.confirm import ExactRows, Row
from lqlora_dagster.decompose.inits import ConfigError
from lqlora_dagster.decompose.lq import InputCache, LQSettings
from lqlora_dagster.error_estimation.compute import RowRequest, compute_rows
from lqlora_dagster.methods import get_method
from lqlora_dagster.models.targets import Target
from lqlora_dagster.models.weights import key_to_file, read_target_weights
from lqlora_dagster.pipeline.base_model_stage import recorded_targets
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.error_table_refs import check_rank_fits, fast_path, table_frame, table_refs
from lqlora_dagster.pipeline.handles import ErrorTableHandle, FisherHandle, ModelHandle, TableRef
from lqlora_dagster.pipeline.settings import ErrorTableSettings
from lqlora_dagster.quant.config import QuantConfig, storage_bits
from lqlora_dagster.store.schemas import QUANT_ERRORS


def table_handle(model: ModelHandle, fisher: FisherHandle | None, s: ErrorTableSettings) -> ErrorTableHandle:
    return ErrorTableHandle(model.model, model.key, s.lq(), table_refs(model, fisher, s))


def _stored_pairs(ctx: StageContext, table_key: str) -> set[tuple[str, str]]:
    rows = ctx.warehouse.query("SELECT matrix, config FROM quant_errors WHERE table_key = ?", [table_key])
    return set(zip(rows["matrix"], rows["config"]))


def _missing_requests(
    ctx: StageContext, refs: list[TableRef], targets: list[Target], s: ErrorTableSettings
) -> list[RowRequest]:
    """The rows the tables lack for `targets`; tables shared by several methods (same
    init) are computed once, for the union of their candidate configs. The other ranks
    of a multi-rank fast table ride on the request of its base rank: if any rank of the
    family lacks a matrix, the whole family is computed for it (same bits again)."""
    by_key: dict[str, TableRef] = {}
    wanted: dict[str, list[str]] = defaultdict(list)
    for ref in refs:
        by_key.setdefault(ref.table_key, ref)
        wanted[ref.table_key] += [c for c in ref.configs if c not in wanted[ref.table_key]]
    heads = {(r.method, r.rank): r.table_key for r in refs}
    family: dict[str, list[TableRef]] = defaultdict(list)  # base key -> the refs priced on it
    for ref in by_key.values():
        if ref.priced_on_rank is not None:
            family[heads[(ref.method, ref.priced_on_rank)]].append(ref)
    riders = {r.table_key for lows in family.values() for r in lows}
    done = {key: _stored_pairs(ctx, key) for key in by_key}
    requests = []
    for key, ref in by_key.items():
        if key in riders:
            continue
        fast = fast_path(get_method(ref.method), s) if ref.exact_key is not None else None
        lows = family.get(key, [])
        configs = tuple(dict.fromkeys(wanted[key] + [c for low in lows for c in wanted[low.table_key]]))
        for t in targets:
            if lows:
                if all((t.name, c) in done[k] for k in [key, *(low.table_key for low in lows)] for c in wanted[k]):
                    continue
                riders = tuple(RowRequest(low, t, tuple(wanted[low.table_key]), low.table_key, fast) for low in lows)
                requests.append(RowRequest(ref, t, configs, key, fast, riders))
                continue
            missing = tuple(c for c in wanted[key] if (t.name, c) not in done[key])
            if missing:
                requests.append(RowRequest(ref, t, missing, key, fast))
    return requests


def _table_progress(ctx: StageContext, refs: list[TableRef]) -> tuple[int, int]:
    """(matrices whose wanted rows are all stored, matrices in all tables), across
    processes. A key may hold more configs than this run wants (shared by methods
    with other candidates): only the wanted ones count."""
    wanted: dict[str, set[str]] = defaultdict(set)
    for r in refs:
        wanted[r.table_key] |= set(r.configs)
    done = 0
    for key, configs in wanted.items():
        rows = ctx.warehouse.query(
            "SELECT count(*) AS n FROM (SELECT matrix FROM quant_errors WHERE table_key = ? AND list_contains(?, config) "
            "GROUP BY matrix HAVING count(*) = ?)",
            [key, sorted(configs), len(configs)],
        )
        done += int(rows["n"].iloc[0])
    n_matrices = max((r.n_rows // len(r.configs) for r in refs), default=0)
    return done, n_matrices * len(wanted)


# confirmation's exact rows gather this many seconds of work before one write: opening
# the shared database file and checking a frame cost ~35 ms each, as much as a small
# matrix's exact row, and written one matrix at a time (a row or two each) they were a
# fifth of confirmation's CPU time
EXACT_FLUSH_SECONDS = 5.0
# matrices confirmation keeps prepared between its rounds (with their Fisher diagonals):
# SmolLM2-135M's all fit; a larger model's rounds keep the most recently used
EXACT_INPUT_BYTES = 2**30


class _Committer:
    """Rows go to DuckDB in batches at most `every` seconds apart (0: each matrix as it
    finishes): one pandera check and one upsert per batch. `flush` writes what is
    gathered; confirmation calls it when a round's loop ends, normally or not, so a crash
    there loses at most the last few seconds of exact rows."""

    def __init__(self, ctx: StageContext, model: ModelHandle, every: float):
        self.ctx, self.model, self.every = ctx, model, every
        self.frames: list[pd.DataFrame] = []
        self.last = time.monotonic()

    def __call__(self, request: RowRequest, results: list[ConfigError]) -> None:
        self.frames.append(table_frame(request.table_key, request.ref, self.model.model, request.target, results))
        if time.monotonic() - self.last >= self.every:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if not self.frames:
            return
        frame, self.frames = pd.concat(self.frames, ignore_index=True), []
        self.ctx.warehouse.upsert("quant_errors", QUANT_ERRORS.validate(frame), ["table_key", "matrix", "config"])


class _ReadOnDemand:
    """Tensors read when a worker first asks for one and dropped after its last use
    (thread-safe): a chunk step holds the matrices its workers are on, not all of its
    matrices (on a 7B model one chunk's weights alone would be 13 GB)."""

    def __init__(self, read: Callable[[Hashable], torch.Tensor], uses: dict):
        self._read, self._uses, self._held, self._lock = read, dict(uses), {}, threading.Lock()

    def get(self, key: Hashable) -> torch.Tensor:
        with self._lock:
            self._uses[key] -= 1
            tensor = self._held.pop(key, None)
            if tensor is None:
                tensor = self._read(key)
            if self._uses[key] > 0:
                self._held[key] = tensor
        return tensor


def _sources(ctx: StageContext, model: ModelHandle, requests: list[RowRequest]):
    """weight_of and fisher_of for the requests' matrices, each read from its file when
    a worker starts on it and freed after its last request."""
    targets = {r.target.name: r.target for r in requests}
    files = key_to_file(Path(model.folder))
    if all(f"{name}.weight" in files for name in targets):
        def read(name: str) -> torch.Tensor:
            return read_target_weights(model.folder, [targets[name]])[name]
    else:  # names the checkpoint does not hold: one whole-model load for all of them, as before
        read = read_target_weights(model.folder, list(targets.values())).pop
    weights = _ReadOnDemand(read, Counter(r.target.name for r in requests))
    artifacts = {
        key: ctx.store.get("fisher_diagonals", model.model, key)
        for key in {r.ref.fisher_key for r in requests if r.ref.fisher_key}
    }
    fishers = _ReadOnDemand(
        lambda key: ctx.store.load_tensors(artifacts[key[0]], keys=[key[1]])[0][key[1]],
        Counter((r.ref.fisher_key, r.target.name) for r in requests if r.ref.fisher_key),
    )

    def weight_of(t: Target) -> torch.Tensor:
        return weights.get(t.name).to(ctx.device)

    def fisher_of(r: RowRequest) -> torch.Tensor | None:
        return fishers.get((r.ref.fisher_key, r.target.name)).to(ctx.device) if r.ref.fisher_key else None

    return weight_of, fisher_of


def compute_table_rows(
    ctx: StageContext,
    model: ModelHandle,
    fisher: FisherHandle | None,
    s: ErrorTableSettings,
    matrices: list[str] | None = None,
    workers: int | None = None,
) -> int:
    """Compute and commit the missing rows of the run's tables for `matrices` (default:
    all targets), `workers` at a time (default: the context's); returns the rows
    written. Safe to run concurrently on disjoint matrix sets (the chunk steps)."""
    all_targets = recorded_targets(ctx, model.model)
    refs = table_refs(model, fisher, s)
    check_rank_fits(model, all_targets, max(r.rank for r in refs))
    targets = [t for t in all_targets if matrices is None or t.name in set(matrices)]
    requests = _missing_requests(ctx, refs, targets, s)
    if not requests:
        return 0
    weight_of, fisher_of = _sources(ctx, model, requests)
    start = time.perf_counter()

    def progress(i: int, n: int, request: RowRequest) -> None:
        done, total = _table_progress(ctx, refs)
        ctx.progress("error_table", done, total, "matrices", f"{request.target.name}, {time.perf_counter() - start:.0f}s")

    workers = ctx.matrix_workers if workers is None else workers
    commit = _Committer(ctx, model, every=0.0)  # each matrix as it finishes: a kill loses only the one in flight
    return compute_rows(requests, s.lq(), weight_of, fisher_of, commit, workers, progress)


def load_table(ctx: StageContext, ref: TableRef) -> pd.DataFrame:
    """The rows of one table restricted to its candidate configs (long form). Storage is
    recounted from (numel, config) by the current rule, so rows stored under an older
    accounting still plan exactly what the artifacts will measure."""
    frame = ctx.warehouse.query(
        "SELECT matrix, config, rank, numel, error FROM quant_errors WHERE table_key = ?", [ref.table_key],
    )
    frame = frame[frame["config"].isin(ref.configs)].reset_index(drop=True)
    configs = {name: QuantConfig.parse(name) for name in frame["config"].unique()}
    frame["storage_bits"] = [storage_bits(int(n), configs[c]) for n, c in zip(frame["numel"], frame["config"])]
    frame["bits_per_param"] = frame["storage_bits"] / frame["numel"]
    return frame


def exact_home(ref: TableRef) -> str:
    """The key exact rows of `ref` live under: its exact twin's, or its own when exact."""
    return ref.exact_key or ref.table_key


def known_exact_rows(ctx: StageContext, refs: list[TableRef]) -> dict[Row, float]:
    """Every exact row already stored for these tables (one per rank), as (matrix, config, rank)."""
    out: dict[Row, float] = {}
    for ref in refs:
        found = ctx.warehouse.query(
            "SELECT matrix, config, error FROM quant_errors WHERE table_key = ?", [exact_home(ref)]
        )
        out.update({(m, c, ref.rank): float(e) for m, c, e in zip(found["matrix"], found["config"], found["error"])})
    return out


def exact_rows(ctx: StageContext, model: ModelHandle, refs: list[TableRef], lq: LQSettings) -> ExactRows:
    """For plan confirmation: the exact error of (matrix, config, rank) rows of a
    method's tables (`refs`, one per rank), looked up under each table's exact key
    (`ref.exact_key`, or its own key when its rows are exact) or computed and committed
    there, so later plans and an exhaustive run of the table reuse them."""
    by_rank = {r.rank: r for r in refs}
    targets = {t.name: t for t in recorded_targets(ctx, model.model)}

    def home(rank: int) -> str:
        return exact_home(by_rank[rank])

    def lookup(rows: list[Row]) -> dict[Row, float]:
        out: dict[Row, float] = {}
        for rank in sorted({r for _, _, r in rows}):
            names = sorted({m for m, _, r in rows if r == rank})
            found = ctx.warehouse.query(
                "SELECT matrix, config, error FROM quant_errors WHERE table_key = ? AND list_contains(?, matrix)",
                [home(rank), names],
            )
            known = dict(zip(zip(found["matrix"], found["config"]), found["error"].astype(float)))
            out.update({row: known[row[:2]] for row in rows if row[2] == rank and row[:2] in known})
        return out

    rounds: list[int] = []  # matrices computed in each round that computed any
    inputs = InputCache(EXACT_INPUT_BYTES)  # the rounds' matrices, prepared once

    def compute(rows: list[Row]) -> dict[Row, float]:
        out = lookup(rows)
        todo: dict[tuple[str, int], list[str]] = defaultdict(list)
        for m, c, r in rows:
            if (m, c, r) not in out:
                todo[(m, r)].append(c)
        requests = [
            RowRequest(by_rank[r], targets[m], tuple(cs), home(r)) for (m, r), cs in sorted(todo.items())
        ]
        if not requests:
            return out
        weight_of, fisher_of = _sources(ctx, model, requests)
        commit_to_db = _Committer(ctx, model, every=EXACT_FLUSH_SECONDS)

        def commit(request: RowRequest, results: list[ConfigError]) -> None:
            commit_to_db(request, results)
            out.update({(request.target.name, r.config.name, request.ref.rank): float(r.error) for r in results})

        start = time.perf_counter()
        rounds.append(len(requests))
        what = f"confirm {refs[0].method}, round {len(rounds)}"  # a new bar (and ETA) per round

        def progress(i: int, n: int, request: RowRequest) -> None:
            if i % max(1, n // 20) == 0 or i == n:
                spent = time.perf_counter() - start
                eta = f", about {spent / i * (n - i):.0f}s left" if i < n else ""
                ctx.progress(what, i, n, "matrices", f"exact rows, {spent:.0f}s{eta}")

        try:
            compute_rows(requests, lq, weight_of, fisher_of, commit, ctx.matrix_workers, progress, inputs)
        finally:
            commit_to_db.flush()
        return out

    return compute
