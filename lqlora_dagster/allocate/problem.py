"""The allocation problem: per-matrix candidates with their error and storage.

Input is the error table in long form, one row per candidate: a matrix, a config and
the rank of its low-rank factors (`rank`, 0 when absent: a table of one rank). The
`storage_bits` column is what counts against the budget (the planning stage adds the
factors' bits when the budget kind counts them). Validation and the feasibility
check live here so the ILP and the uniform allocator share them.
"""

import math
from dataclasses import dataclass, field

import pandas as pd

from lqlora_dagster.errors import LQLoRAInputError

REQUIRED_COLUMNS = ("matrix", "config", "numel", "storage_bits", "error")
CANDIDATE = ["matrix", "config", "rank"]  # what identifies a row of the problem

Row = tuple[str, str, int]  # (matrix, config, rank): one candidate


@dataclass(frozen=True)
class Allocation:
    """A solved plan: one (config, rank) per matrix."""

    assignment: dict[str, str]  # matrix -> config name
    objective: float  # total error of the assignment
    bound: float  # best lower bound proven by the solver
    gap: float  # (objective - bound) / |objective|
    status: str
    solve_s: float
    budget: float
    bits_per_param: float  # achieved storage / total numel

    ranks: dict[str, int] = field(default_factory=dict)  # matrix -> rank (empty: a table of one rank, 0)

    @property
    def meets_budget(self) -> bool:
        return self.bits_per_param <= self.budget + 1e-9

    def rows(self) -> list[Row]:
        """The picked candidates as (matrix, config, rank)."""
        return [(m, c, self.ranks.get(m, 0)) for m, c in self.assignment.items()]


def with_rank(table: pd.DataFrame) -> pd.DataFrame:
    """The table with a `rank` column (0 where it has none: one rank, no choice)."""
    return table if "rank" in table.columns else table.assign(rank=0)


def check_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table, validated, with its `rank` column."""
    if not isinstance(table, pd.DataFrame) or table.empty:
        raise LQLoRAInputError("the error table is empty: there is no config to choose from")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise LQLoRAInputError(f"the error table lacks columns {missing}; it needs {list(REQUIRED_COLUMNS)}")
    errors = table["error"].astype(float)
    if not errors.map(math.isfinite).all() or (errors < 0).any():
        bad = table.loc[~errors.map(math.isfinite) | (errors < 0), ["matrix", "config", "error"]].head(3)
        raise LQLoRAInputError(
            f"errors must be finite and >= 0; first bad rows:\n{bad.to_string(index=False)}"
        )
    table = with_rank(table)
    dup = table.duplicated(CANDIDATE)
    if dup.any():
        row = table.loc[dup].iloc[0]
        raise LQLoRAInputError(
            f"matrix {row['matrix']!r} has config {row['config']!r} at rank {row['rank']} more than once"
        )
    return table


def total_numel(table: pd.DataFrame) -> int:
    return int(table.groupby("matrix")["numel"].first().sum())


def cheapest_bits(table: pd.DataFrame) -> float:
    """Bits per parameter of the cheapest plan: every matrix at its cheapest candidate."""
    return float(table.groupby("matrix")["storage_bits"].min().sum() / total_numel(table))


def check_budget(table: pd.DataFrame, budget: float) -> None:
    """A positive finite budget that at least the cheapest plan meets."""
    if not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise LQLoRAInputError(f"budget must be a positive number of bits per parameter, got {budget!r}")
    cheapest = cheapest_bits(table)
    if budget < cheapest - 1e-12:
        low_b = table.loc[table["storage_bits"].idxmin(), "config"]
        raise LQLoRAInputError(
            f"budget {budget:g} bits/param is below the cheapest plan, {cheapest:.4f} "
            f"(every matrix at its cheapest config, e.g. {low_b}); raise the budget to at least "
            f"{math.ceil(cheapest * 1000) / 1000:.3f} or add cheaper configs"
        )


def pareto_front(table: pd.DataFrame) -> pd.DataFrame:
    """Per matrix, drop candidates that another candidate beats on both storage and error.

    Exact for the ILP: a dominated candidate can always be swapped for its dominator
    without raising cost or storage. Shrinks 432 configs to about 20 per matrix.
    """
    keep = []
    for _, group in table.sort_values(["matrix", "storage_bits", "error"]).groupby("matrix", sort=False):
        best = math.inf
        for idx, err in zip(group.index, group["error"]):
            if err < best:
                keep.append(idx)
                best = err
    return table.loc[keep]
