"""Bit allocation by integer linear program (Pyomo model, HiGHS solver).

min  sum_ic e[i,c] x[i,c]
s.t. sum_c x[i,c] = 1                        for every matrix i
     sum_ic s[i,c] x[i,c] <= budget * sum_i numel_i
     x binary

A candidate c of matrix i is a (config, rank) pair: with several ranks in the table
the program picks bits and rank together, under one storage budget.

HiGHS is given the total error of a greedy plan (`incumbent.py`) as an objective bound:
finding a plan that good took most of its time; proving optimality is still its own.
"""

import time

import pandas as pd
import pyomo.environ as pyo
from pyomo.contrib.solver.common.factory import SolverFactory

from lqlora_dagster.allocate.incumbent import greedy_total_error
from lqlora_dagster.allocate.problem import (
    CANDIDATE,
    Allocation,
    check_budget,
    check_table,
    pareto_front,
    total_numel,
)
from lqlora_dagster.errors import LQLoRAInputError


def build_model(table: pd.DataFrame, budget: float) -> pyo.ConcreteModel:
    pairs = list(zip(table["matrix"], table["config"], table["rank"].astype(int)))
    error = dict(zip(pairs, table["error"].astype(float)))
    storage = dict(zip(pairs, table["storage_bits"].astype(float)))
    by_matrix: dict[str, list] = {}
    for p in pairs:
        by_matrix.setdefault(p[0], []).append(p)

    m = pyo.ConcreteModel("bit_allocation")
    m.x = pyo.Var(pairs, domain=pyo.Binary)
    m.one_config = pyo.Constraint(sorted(by_matrix), rule=lambda m, i: sum(m.x[p] for p in by_matrix[i]) == 1)
    m.budget = pyo.Constraint(expr=sum(storage[p] * m.x[p] for p in pairs) <= budget * total_numel(table))
    # Scale the objective so HiGHS's absolute tolerances mean the same for any table.
    scale = max(error.values()) or 1.0
    m.total_error = pyo.Objective(expr=sum(error[p] / scale * m.x[p] for p in pairs), sense=pyo.minimize)
    m.error_scale = scale
    return m


def _bound(value: float) -> float:
    """A cutoff the greedy plan itself passes, whatever order HiGHS sums its objective in."""
    return value * (1 + 1e-9) + 1e-12


def _solve(solver, model: pyo.ConcreteModel, rel_gap: float, time_limit_s: float, options: dict):
    return solver.solve(
        model,
        rel_gap=rel_gap,
        time_limit=time_limit_s,
        load_solutions=False,
        raise_exception_on_nonoptimal_result=False,
        solver_options=options,
    )


def solve_ilp(
    table: pd.DataFrame, budget: float, *, rel_gap: float = 0.0, time_limit_s: float = 120.0
) -> Allocation:
    """Optimal (config, rank) per matrix under `budget` bits/param (storage with padding)."""
    table = check_table(table)
    check_budget(table, budget)
    front = pareto_front(table)
    model = build_model(front, budget)
    solver = SolverFactory("highs")
    if not solver.available():
        raise LQLoRAInputError("the HiGHS solver is not available; `pip install highspy`")
    start = time.perf_counter()
    greedy = greedy_total_error(front, budget)
    options = {} if greedy is None else {"objective_bound": _bound(greedy / model.error_scale)}
    result = _solve(solver, model, rel_gap, time_limit_s, options)
    if result.incumbent_objective is None and options:  # no plan found under the bound in time
        # (the solver object keeps options between solves: unset the bound explicitly)
        result = _solve(solver, model, rel_gap, time_limit_s, {"objective_bound": float("inf")})
    solve_s = time.perf_counter() - start
    if result.incumbent_objective is None:
        raise LQLoRAInputError(
            f"HiGHS found no plan within {time_limit_s:g} s (status {result.termination_condition})"
        )
    result.solution_loader.load_vars()
    chosen = [p for p in model.x if pyo.value(model.x[p]) > 0.5]
    picked = front.set_index(CANDIDATE).loc[chosen]
    objective = float(picked["error"].sum())
    bound = float(result.objective_bound) * model.error_scale
    return Allocation(
        assignment={m: c for m, c, _ in chosen},
        ranks={m: int(r) for m, _, r in chosen},
        objective=objective,
        bound=bound,
        gap=max(0.0, (objective - bound) / abs(objective)) if objective else 0.0,
        status=result.solution_status.name,  # "optimal" or "feasible" (time limit hit)
        solve_s=solve_s,
        budget=float(budget),
        bits_per_param=float(picked["storage_bits"].sum()) / total_numel(front),
    )
