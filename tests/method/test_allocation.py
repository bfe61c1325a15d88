"""ILP allocation against brute force; budgets; uniform plans."""

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from lqlora_dagster.allocate.ilp import solve_ilp
from lqlora_dagster.allocate.incumbent import greedy_total_error
from lqlora_dagster.allocate.problem import pareto_front
from lqlora_dagster.allocate.uniform import solve_uniform
from lqlora_dagster.errors import LQLoRAInputError


def random_table(seed: int, n_matrices: int = 6, n_configs: int = 5) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_matrices):
        numel = int(rng.integers(100, 2000))
        for c in range(n_configs):
            bits = 2 + c * 0.6 + rng.random() * 0.5
            rows.append(
                dict(
                    matrix=f"m{i}",
                    config=f"c{c}",
                    numel=numel,
                    storage_bits=int(numel * bits),
                    error=float(rng.random() * 10 / (c + 1)),
                )
            )
    return pd.DataFrame(rows)


def brute_force(table: pd.DataFrame, budget: float) -> float:
    numel = table.groupby("matrix")["numel"].first().sum()
    options = [list(g[["storage_bits", "error"]].itertuples(index=False)) for _, g in table.groupby("matrix")]
    best = math.inf
    for combo in itertools.product(*options):
        if sum(s for s, _ in combo) <= budget * numel:
            best = min(best, sum(e for _, e in combo))
    return best


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("budget", [2.6, 3.0, 3.6, 4.5])
def test_ilp_equals_brute_force(seed, budget):
    table = random_table(seed)
    expected = brute_force(table, budget)
    if math.isinf(expected):
        with pytest.raises(LQLoRAInputError, match="below the cheapest plan"):
            solve_ilp(table, budget)
        return
    plan = solve_ilp(table, budget)
    assert plan.objective == pytest.approx(expected, rel=1e-9)
    assert plan.meets_budget and plan.status == "optimal" and plan.gap < 1e-9
    assert sorted(plan.assignment) == sorted(table["matrix"].unique())  # each matrix once


def test_budget_above_everything_picks_the_best_config():
    table = random_table(1)
    plan = solve_ilp(table, 100.0)
    assert plan.objective == pytest.approx(table.groupby("matrix")["error"].min().sum())


def test_infeasible_budget_names_the_minimum():
    table = random_table(2)
    cheapest = (
        table.groupby("matrix")["storage_bits"].min().sum() / table.groupby("matrix")["numel"].first().sum()
    )
    with pytest.raises(LQLoRAInputError, match=f"below the cheapest plan, {cheapest:.4f}"):
        solve_ilp(table, cheapest - 0.01)
    assert solve_ilp(table, cheapest).meets_budget


@pytest.mark.parametrize("budget", [0, -1, float("nan"), float("inf"), "3"])
def test_nonsense_budgets(budget):
    with pytest.raises(LQLoRAInputError, match="positive number of bits"):
        solve_ilp(random_table(0), budget)


def test_empty_table():
    with pytest.raises(LQLoRAInputError, match="empty"):
        solve_ilp(pd.DataFrame(columns=["matrix", "config", "numel", "storage_bits", "error"]), 3.0)


def test_bad_errors_are_rejected():
    table = random_table(0)
    table.loc[3, "error"] = float("nan")
    with pytest.raises(LQLoRAInputError, match="finite and >= 0"):
        solve_ilp(table, 3.0)


def test_pareto_front_keeps_the_optimum():
    table = random_table(3, n_matrices=5, n_configs=8)
    front = pareto_front(table)
    assert len(front) < len(table)
    assert brute_force(front, 3.2) == brute_force(table, 3.2)


def test_uniform_picks_one_config_for_all():
    table = random_table(4)
    plan = solve_uniform(table, 3.5)
    assert len(set(plan.assignment.values())) == 1 and plan.meets_budget
    best = min(
        (g["error"].sum(), c)
        for c, g in table.groupby("config")
        if g["storage_bits"].sum() <= 3.5 * table.groupby("matrix")["numel"].first().sum()
    )
    assert plan.objective == pytest.approx(best[0])
    with pytest.raises(LQLoRAInputError, match="below the cheapest uniform plan"):
        solve_uniform(table, 1.0)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("budget", [2.6, 3.0, 3.6, 4.5])
def test_greedy_incumbent_is_a_feasible_plan_no_better_than_the_optimum(seed, budget):
    table = random_table(seed)
    expected = brute_force(table, budget)
    greedy = greedy_total_error(pareto_front(table), budget)
    if math.isinf(expected):
        assert greedy is None
        return
    assert expected - 1e-12 <= greedy <= table.groupby("matrix")["error"].min().sum() + table["error"].max() * 6


def test_greedy_incumbent_climbs_each_matrix_hull_by_error_saved_per_bit():
    # m0: 100 weights at 2/3/4 bits, errors 9/5/4 (saves 4, then 1, per 100 bits); m1: 100
    # weights at 2/3 bits, errors 6/3 (saves 3 per 100 bits). The cheapest plan stores 400
    # bits (2.0 bits/param); each further 0.5 bits/param is one more 100-bit step, the best first.
    rows = [("m0", "a", 200, 9.0), ("m0", "b", 300, 5.0), ("m0", "c", 400, 4.0), ("m1", "a", 200, 6.0),
            ("m1", "b", 300, 3.0)]
    table = pd.DataFrame([dict(matrix=m, config=c, numel=100, storage_bits=s, error=e) for m, c, s, e in rows])
    assert greedy_total_error(table, 2.0) == 15.0
    assert greedy_total_error(table, 2.25) == 15.0  # 50 bits spare: no whole step
    assert greedy_total_error(table, 2.5) == 11.0  # m0's first step
    assert greedy_total_error(table, 3.0) == 8.0  # then m1's
    assert greedy_total_error(table, 3.5) == 7.0  # then m0's second
    assert greedy_total_error(table, 1.9) is None


def test_ilp_still_solves_when_the_incumbent_bound_is_too_tight(monkeypatch):
    """A bound below every plan leaves HiGHS nothing to find: the solve runs again without it."""
    from lqlora_dagster.allocate import ilp

    table = random_table(3)
    expected = brute_force(table, 3.6)
    monkeypatch.setattr(ilp, "greedy_total_error", lambda front, budget: 1e-9)
    plan = solve_ilp(table, 3.6)
    assert plan.objective == pytest.approx(expected, rel=1e-9) and plan.status == "optimal"
