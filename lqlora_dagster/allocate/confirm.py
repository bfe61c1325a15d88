"""Plans on an estimated error table, made exact where they choose.

A fast error table estimates most rows, so a plan solved on it may pick a config whose
estimate is off, and its stated error is then not what the decomposition stage will
realize. Confirmation solves on optimistic values (the exact error where known, the
estimate times 1 - margin elsewhere), computes the exact error of every pick not yet
known (the exhaustive table's row), and solves again until every pick is exact.

If the optimistic values are lower bounds, the result is the exhaustive table's plan:
any other plan costs at least its optimistic total, which is at least this plan's
exact one. The fast table mostly overestimates (factors fitted to a neighbouring
config, few steps of their own), so a margin of a few percent makes its rows lower
bounds nearly everywhere; how close the plans come is measured in
bench/bench_error_table.py, not promised here. Rows whose estimates run higher (lower
ranks priced on a higher rank's factors) carry their own margin in a `margin` column.

Exact rows known before the first round (`known`) count as exact from the start: a plan
confirmed after others on the same candidates can then never end worse than any of
them, since each of those is a feasible choice at its exact values.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lqlora_dagster.allocate.problem import CANDIDATE, Allocation, Row, with_rank
from lqlora_dagster.errors import LQLoRAInputError

ExactRows = Callable[[list[Row]], dict[Row, float]]
Solver = Callable[[pd.DataFrame, float], Allocation]


@dataclass(frozen=True)
class ConfirmedPlan:
    plan: Allocation  # every pick's error is exact, and so is the objective
    table: pd.DataFrame  # the last round's values: exact where known, optimistic elsewhere
    exact: dict[Row, float]  # the exact errors this plan asked for
    rounds: int


def check_margin(margin: float) -> None:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise LQLoRAInputError(f"confirm_margin must be a number in [0, 1), got {margin!r}")


def confirm_plan(
    table: pd.DataFrame,
    budget: float,
    exact_rows: ExactRows,
    solve: Solver,
    margin: float,
    progress: Callable[[int, int, Allocation], None] | None = None,
    known: dict[Row, float] | None = None,
) -> ConfirmedPlan:
    """Solve `table` (estimates in `error`) at `budget` until every pick is exact.

    `exact_rows(rows)` returns the exact error of each requested (matrix, config, rank);
    `progress(round, n_new, plan)` is called before each batch is computed; `known`
    holds exact rows already computed."""
    check_margin(margin)
    table = with_rank(table)
    keys = [(m, c, int(r)) for m, c, r in table[CANDIDATE].itertuples(index=False)]
    position = {key: i for i, key in enumerate(keys)}
    margins = table["margin"].astype(float).to_numpy() if "margin" in table.columns else margin
    optimistic = table["error"].astype(float).to_numpy() * (1 - margins)
    storage = table["storage_bits"].astype(float).to_numpy()
    by_matrix: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        by_matrix.setdefault(key[0], []).append(i)
    rows_of = {m: np.asarray(ix) for m, ix in by_matrix.items()}
    # this round's values: the exact error where known, the optimistic one elsewhere
    values_now, is_exact = optimistic.copy(), np.zeros(len(keys), dtype=bool)
    exact: dict[Row, float] = {}
    rounds = 0

    def record(rows: dict[Row, float]) -> None:
        exact.update(rows)
        for row, value in rows.items():
            i = position[row]
            values_now[i], is_exact[i] = value, True

    record({row: v for row, v in (known or {}).items() if row in position})

    def confirm(rows: list[Row]) -> None:
        got = exact_rows(rows)
        missing = [row for row in rows if row not in got]
        if missing:
            raise RuntimeError(f"no exact error was computed for {missing[:3]}")
        record({row: v for row, v in got.items() if row in position})

    while True:
        rounds += 1
        values = table.assign(error=values_now.copy()).drop(columns=["margin"], errors="ignore")
        plan = solve(values, budget)
        new = [row for row in plan.rows() if row not in exact]
        if not new:
            return ConfirmedPlan(plan, values, exact, rounds)
        if progress is not None:
            progress(rounds, len(new), plan)
        confirm(new)
        # a pick whose exact error came out above the optimistic value of a candidate
        # that stores its matrix in no more bits would lose to that one in the next round:
        # confirm such candidates now, saving the ILP rounds that would find them one by one
        beaten = []
        for row in new:
            ix = rows_of[row[0]]
            hit = ix[~is_exact[ix] & (storage[ix] <= storage[position[row]]) & (optimistic[ix] < exact[row])]
            beaten += [keys[i] for i in hit]
        if beaten:
            confirm(list(dict.fromkeys(beaten)))
