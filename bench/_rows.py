"""Error-table rows for the benchmarks through the pipeline's own loop
(`error_table.compute.compute_rows`): the matrices come from memory and the rows go
into a DataFrame instead of DuckDB, everything else is what the chunk steps and plan
confirmation run."""

import pandas as pd
import torch

from lqlora_dagster.decompose.inits import ConfigError
from lqlora_dagster.decompose.lq import LQSettings
from lqlora_dagster.error_table.compute import RowRequest, compute_rows
from lqlora_dagster.error_table.estimates import FastSettings
from lqlora_dagster.models.targets import Target
from lqlora_dagster.pipeline.handles import TableRef
from lqlora_dagster.quant.config import QuantConfig, storage_bits


def requests_for(
    mats: dict[str, torch.Tensor], configs: dict[str, list[str]], lq: LQSettings,
    fast: FastSettings | None = None, method: str = "lqlora",
) -> list[RowRequest]:
    """One request per matrix for `configs[name]` (names of configs)."""
    key = "bench-estimated" if fast is not None else "bench-exact"
    out = []
    for name, wanted in configs.items():
        W = mats[name]
        ref = TableRef(method, key, lq.rank, None, list(wanted), len(wanted))
        target = Target(name, W.shape[0], W.shape[1], int(name.split(".")[2]), name.rsplit(".", 1)[-1], False)
        out.append(RowRequest(ref, target, tuple(wanted), key, fast))
    return out


def as_rows(name: str, W: torch.Tensor, results: list[ConfigError]) -> list[dict]:
    return [
        {
            "matrix": name,
            "config": r.config.name,
            "numel": W.numel(),
            "storage_bits": storage_bits(W.numel(), r.config),
            "error": r.error,
        }
        for r in results
    ]


def table_rows(
    mats: dict[str, torch.Tensor], grid: tuple[QuantConfig, ...], lq: LQSettings,
    fast: FastSettings | None = None, workers: int = 2,
) -> pd.DataFrame:
    """Every config of `grid` for every matrix, `workers` matrices at a time on one
    torch thread each (as the pipeline computes them); estimated by `fast`, or exact."""
    names = [c.name for c in grid]
    rows: list[dict] = []

    def commit(request: RowRequest, results: list[ConfigError]) -> None:
        rows.extend(as_rows(request.target.name, mats[request.target.name], results))

    requests = requests_for(mats, {n: names for n in mats}, lq, fast)
    compute_rows(requests, lq, lambda t: mats[t.name], lambda r: None, commit, workers)
    return pd.DataFrame(rows)
