"""The one loop that computes error-table rows and hands them over, matrix by matrix.

The table's chunk steps, plan confirmation and the benchmarks all call `compute_rows`;
they differ only in where weights come from and where rows go (`commit`: DuckDB in the
pipeline, a dict in a benchmark). Matrices run `workers` at a time on one torch thread
each (`per_matrix_threads.py`), so a row is the same bits wherever it is computed, and
`commit` runs in the caller's thread as each matrix finishes: a crash loses at most
the matrices in flight.
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lqlora_dagster.decompose.inits import ConfigError
from lqlora_dagster.decompose.lq import InputCache, LQInput, LQSettings, prepare
from lqlora_dagster.error_estimation.estimates import FastSettings, estimated_errors_by_rank
from lqlora_dagster.error_estimation.table_ref import TableRef
from lqlora_dagster.methods import get_method
from lqlora_dagster.models.targets import Target
from lqlora_dagster.per_matrix_threads import one_thread_per_matrix
from lqlora_dagster.quant.config import QuantConfig


@dataclass(frozen=True)
class RowRequest:
    """Rows of one matrix of one table: estimated by `fast`, or exact when it is None.

    `riders` are requests of the same matrix at the other ranks of the same fast table
    family: priced on this request's factors (`estimates.py`)."""

    ref: TableRef
    target: Target
    configs: tuple[str, ...]
    table_key: str  # where the rows belong: ref.table_key, or ref.exact_key for exact rows of a fast table
    fast: FastSettings | None = None
    riders: tuple["RowRequest", ...] = ()

    @property
    def exact(self) -> bool:
        return self.fast is None


def request_rows(
    request: RowRequest, W: "torch.Tensor | LQInput", lq: LQSettings, fisher: torch.Tensor | None
) -> list[tuple[RowRequest, list[ConfigError]]]:
    """The rows of one request (and of its riders), each in the order of its configs
    (an exact request's `W` may come prepared, with its Fisher diagonal in it)."""
    init = get_method(request.ref.method).init
    F = fisher if init.fisher else None
    rank = request.ref.rank
    configs = tuple(QuantConfig.parse(c) for c in request.configs)
    if request.fast is None:
        return [(request, init.exact_errors_at(W, configs, rank, lq, F))]
    wanted = {low.ref.rank: low for low in request.riders}
    if any(set(low.configs) - set(request.configs) for low in request.riders):
        raise ValueError("rows of other ranks need their configs in the request they are priced on")
    rows = estimated_errors_by_rank(W, configs, dataclasses.replace(lq, rank=rank), F, request.fast, tuple(wanted))
    out = [(request, rows[rank])]
    for r, low in wanted.items():
        by_config = {e.config.name: e for e in rows[r]}
        out.append((low, [by_config[c] for c in low.configs]))
    return out


def compute_rows(
    requests: list[RowRequest],
    lq: LQSettings,
    weight_of: Callable[[Target], torch.Tensor],
    fisher_of: Callable[[RowRequest], torch.Tensor | None],
    commit: Callable[[RowRequest, list[ConfigError]], None],
    workers: int,
    progress: Callable[[int, int, RowRequest], None] | None = None,
    inputs: InputCache | None = None,
) -> int:
    """Compute every request, `workers` matrices at a time; `commit` each as it
    finishes. Returns the number of rows computed. With `inputs`, exact requests take
    their matrix prepared from it (and leave it there for later calls)."""

    def rows_of(request: RowRequest) -> list[tuple[RowRequest, list[ConfigError]]]:
        if inputs is None or not request.exact:
            return request_rows(request, weight_of(request.target), lq, fisher_of(request))
        fisher = get_method(request.ref.method).init.fisher
        data = inputs.get(
            (request.target.name, request.ref.fisher_key if fisher else None),
            lambda: prepare(weight_of(request.target), fisher_of(request) if fisher else None),
        )
        return request_rows(request, data, lq, None)

    written = 0
    for i, (request, parts) in enumerate(one_thread_per_matrix(rows_of, requests, workers), 1):
        for part, results in parts:
            commit(part, results)
            written += len(results)
        if progress is not None:
            progress(i, len(requests), request)
    return written
