"""Stage `allocation_plan`: one plan per (method, budget) from the method's error table.

On a fast (estimated) table each plan is confirmed (`allocate/confirm.py`): the rows
it picks are replaced by their exact values, computed here, until it picks exact rows
only, so its objective is the error the decomposition stage will realize.
"""

import time

import pandas as pd

from lqlora_dagster.allocate.confirm import Solver, confirm_plan
from lqlora_dagster.allocate.problem import Allocation
from lqlora_dagster.error_table.stage import exact_rows, load_table
from lqlora_dagster.methods import get_method
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.handles import ErrorTableHandle, ModelHandle, PlanHandle, PlanRef, TableRef
from lqlora_dagster.pipeline.settings import PlanSettings
from lqlora_dagster.quant.config import QuantConfig
from lqlora_dagster.store.keys import stable_key
from lqlora_dagster.store.schemas import PLAN_ASSIGNMENTS, PLANS

PLAN_VERSION = "2"


def confirm_margin(ref: TableRef, s: PlanSettings) -> float | None:
    """The margin this table's plans are confirmed with; None for exact tables."""
    return s.margin if ref.exact_key is not None else None


def plan_id(ref: TableRef, budget: float, margin: float | None = None) -> str:
    return stable_key(ref.table_key, ref.method, sorted(ref.configs), float(budget), margin, PLAN_VERSION)


def _existing(ctx: StageContext, pid: str) -> PlanRef | None:
    rows = ctx.warehouse.query("SELECT * FROM plans WHERE plan_id = ?", [pid])
    if rows.empty:
        return None
    r = rows.iloc[0]
    return PlanRef(
        pid,
        r["method"],
        float(r["budget"]),
        float(r["bits_per_param"]),
        float(r["objective"]),
        r["table_key"],
    )


def _frames(
    pid: str, model: str, ref: TableRef, table: pd.DataFrame, plan: Allocation
) -> tuple[pd.DataFrame, pd.DataFrame]:
    head = pd.DataFrame(
        [
            {
                "plan_id": pid,
                "model": model,
                "method": ref.method,
                "budget": float(plan.budget),
                "table_key": ref.table_key,
                "objective": plan.objective,
                "bound": plan.bound,
                "gap": plan.gap,
                "status": plan.status,
                "solve_s": plan.solve_s,
                "bits_per_param": plan.bits_per_param,
            }
        ]
    )
    chosen = table.set_index(["matrix", "config"]).loc[list(plan.assignment.items())].reset_index()
    rows = []
    for r in chosen.itertuples():
        c = QuantConfig.parse(r.config)
        rows.append(
            {
                "plan_id": pid,
                "matrix": r.matrix,
                "config": r.config,
                "b": c.b,
                "b0": c.b0,
                "b1": c.b1,
                "block_size": c.B0,
                "group_size": c.B1,
                "bits_per_param": float(r.bits_per_param),
                "error": float(r.error),
            }
        )
    return PLANS.validate(head), PLAN_ASSIGNMENTS.validate(pd.DataFrame(rows))


def run_planning(
    ctx: StageContext, tables: ErrorTableHandle, s: PlanSettings, model: ModelHandle
) -> PlanHandle:
    refs = []
    for ref in tables.tables:
        solve = get_method(ref.method).allocation.solve
        margin = confirm_margin(ref, s)
        table = None
        for budget in s.budgets_for(ref.method):
            pid = plan_id(ref, budget, margin)
            cached = _existing(ctx, pid)
            if cached is not None:
                refs.append(cached)
                continue
            if table is None:
                table = load_table(ctx, ref)
            if margin is None:
                plan, values = solve(table, budget), table
            else:
                plan, values = _confirmed(ctx, model, tables, ref, table, budget, solve, margin)
            head, assignments = _frames(pid, tables.model, ref, values, plan)
            ctx.warehouse.replace_rows("plan_assignments", assignments, {"plan_id": pid})
            ctx.warehouse.upsert("plans", head, ["plan_id"])  # written last: marks the plan complete
            ctx.log(
                f"plan {ref.method} @ {budget:g}: {plan.bits_per_param:.4f} bits/param, "
                f"objective {plan.objective:.4g}, gap {plan.gap:.1e}, {plan.status}"
            )
            refs.append(
                PlanRef(pid, ref.method, float(budget), plan.bits_per_param, plan.objective, ref.table_key)
            )
    return PlanHandle(tables.model, refs, tables.lq)


def _confirmed(
    ctx: StageContext,
    model: ModelHandle,
    tables: ErrorTableHandle,
    ref: TableRef,
    table: pd.DataFrame,
    budget: float,
    solve: Solver,
    margin: float,
) -> tuple[Allocation, pd.DataFrame]:
    start = time.perf_counter()

    def progress(round_: int, n_new: int, plan: Allocation) -> None:
        ctx.log(
            f"confirm {ref.method} @ {budget:g}: round {round_}, {n_new} picks not yet exact "
            f"(optimistic objective {plan.objective:.4g}), {time.perf_counter() - start:.0f}s"
        )

    exact = exact_rows(ctx, model, ref, tables.lq)
    done = confirm_plan(table, budget, exact, solve, margin, progress)
    ctx.log(
        f"confirm {ref.method} @ {budget:g}: every pick exact after {done.rounds} rounds, "
        f"{len(done.exact)} exact rows, {time.perf_counter() - start:.0f}s"
    )
    return done.plan, done.table


def plan_configs(ctx: StageContext, pid: str) -> dict[str, QuantConfig]:
    rows = ctx.warehouse.query("SELECT matrix, config FROM plan_assignments WHERE plan_id = ?", [pid])
    return {r.matrix: QuantConfig.parse(r.config) for r in rows.itertuples()}
