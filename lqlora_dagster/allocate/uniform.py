"""Uniform allocation: one config for every matrix (QLoRA, LoftQ, LQ-LoRA uniform).

Among the allowed (config, rank) candidates, the one with least total error whose
storage fits the budget. With a single allowed config (QLoRA's NF4) this just checks
the budget.
"""

import time

import pandas as pd

from lqlora_dagster.allocate.problem import Allocation, check_table, total_numel
from lqlora_dagster.errors import LQLoRAInputError


def solve_uniform(table: pd.DataFrame, budget: float) -> Allocation:
    table = check_table(table)
    start = time.perf_counter()
    n_matrices = table["matrix"].nunique()
    numel = total_numel(table)
    per_config = table.groupby(["config", "rank"]).agg(
        n=("matrix", "nunique"), error=("error", "sum"), storage=("storage_bits", "sum")
    )
    per_config = per_config[per_config["n"] == n_matrices]
    if per_config.empty:
        raise LQLoRAInputError("no config was evaluated on every matrix; a uniform plan needs one")
    per_config["bits"] = per_config["storage"] / numel
    fits = per_config[per_config["bits"] <= budget + 1e-12]
    if fits.empty:
        config, rank = per_config["bits"].idxmin()
        raise LQLoRAInputError(
            f"budget {budget:g} bits/param is below the cheapest uniform plan, "
            f"{per_config['bits'].min():.4f} ({config}, rank {rank}); raise the budget"
        )
    config, rank = fits["error"].idxmin()
    row = fits.loc[(config, rank)]
    matrices = sorted(table["matrix"].unique())
    return Allocation(
        assignment={m: config for m in matrices},
        ranks={m: int(rank) for m in matrices},
        objective=float(row["error"]),
        bound=float(row["error"]),
        gap=0.0,
        status="optimal",
        solve_s=time.perf_counter() - start,
        budget=float(budget),
        bits_per_param=float(row["bits"]),
    )
