"""Stage `allocation_plan`: one plan per (method, budget[, rank set]) from the method's tables.

The problem a plan solves has one row per candidate (matrix, config, rank): the union
of the method's tables, one per rank. A rank is the factors' rank (for a zero-init
method, the LoRA adapter's), and the budget kind (`allocate/budget.py`) says whether
the factors and the tensors that are not targets count.

On a fast (estimated) table each plan is confirmed (`allocate/confirm.py`): the rows
it picks are replaced by their exact values, computed here, until it picks exact rows
only, so its objective is the error the decomposition stage will realize.
"""

import time
from dataclasses import dataclass

import pandas as pd

from lqlora_dagster.allocate.budget import Budget, capacity, counted_bits, figures
from lqlora_dagster.allocate.confirm import Solver, confirm_plan
from lqlora_dagster.allocate.problem import CANDIDATE, Allocation, cheapest_bits
from lqlora_dagster.methods import get_method
from lqlora_dagster.models.weights import nontarget_bytes
from lqlora_dagster.pipeline.base_model_stage import recorded_targets
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.error_table_stage import exact_rows, known_exact_rows, load_table
from lqlora_dagster.pipeline.handles import ErrorTableHandle, ModelHandle, PlanHandle, PlanRef, TableRef
from lqlora_dagster.pipeline.settings import PlanSettings
from lqlora_dagster.quant.config import QuantConfig
from lqlora_dagster.store.keys import stable_key
from lqlora_dagster.store.schemas import PLAN_ASSIGNMENTS, PLANS

PLAN_VERSION = "4"  # 4: HiGHS starts from a greedy bound (plans may differ within its tolerance); 3: headers


def confirm_margin(refs: list[TableRef], s: PlanSettings) -> float | None:
    """The margin these tables' plans are confirmed with; None when all are exact."""
    return s.margin if any(r.exact_key is not None for r in refs) else None


def plan_id(refs: list[TableRef], budget: Budget, margin: float | None = None, s: PlanSettings | None = None) -> str:
    """The plan's content key. A one-table plan under a quantized-part budget keeps the
    key it had before budget kinds and rank sets existed, so stored plans stay valid."""
    top = refs[-1]
    if len(refs) == 1 and budget.kind == "quantized" and top.priced_on_rank is None:
        return stable_key(top.table_key, top.method, sorted(top.configs), float(budget.value), margin, PLAN_VERSION)
    s = s or PlanSettings()
    other = s.other_rank_margin if margin is not None and any(r.priced_on_rank for r in refs) else None
    lower = s.lower_rank_margin if margin is not None and any(_below_base(r) for r in refs) else None
    after_fixed = s.fixed_rank_plans and len(refs) > 1  # started from the fixed-rank plans' exact rows
    return stable_key([r.table_key for r in refs], top.method, sorted(top.configs), budget.kind, float(budget.value),
                      margin, s.factor_bits, other, after_fixed, *(() if lower is None else (("lower", lower),)),
                      PLAN_VERSION)


def _below_base(ref: TableRef) -> bool:
    """A table of a rank priced on a higher rank's factors, truncated."""
    return ref.priced_on_rank is not None and ref.rank < ref.priced_on_rank


def row_margin(ref: TableRef, s: PlanSettings) -> float:
    """How much lower a table's estimated rows count until confirmed: each kind of row
    runs high by its own amount (bench/results/multirank_table.md)."""
    if ref.priced_on_rank is None:
        return s.confirm_margin
    return s.lower_rank_margin if _below_base(ref) else s.other_rank_margin


@dataclass(frozen=True)
class Problem:
    """One method's candidates with everything a budget needs to count them."""

    table: pd.DataFrame  # matrix, config, rank, numel, rows, cols, storage_bits (Q only), error, bits_per_param
    nontarget_bytes: int

    @property
    def target_numel(self) -> int:
        return int(self.table.groupby("matrix")["numel"].first().sum())

    def with_ranks(self, ranks: list[int]) -> "Problem":
        return Problem(self.table[self.table["rank"].isin(ranks)].reset_index(drop=True), self.nontarget_bytes)

    def for_budget(self, budget: Budget, factor_bits: int) -> tuple[pd.DataFrame, float]:
        """The solver's table (storage as the budget counts it) and its bits/param cap."""
        counted = self.table.assign(storage_bits=counted_bits(self.table, budget, factor_bits))
        return counted, capacity(budget, self.target_numel, self.nontarget_bytes)


def _existing(ctx: StageContext, pid: str) -> PlanRef | None:
    rows = ctx.warehouse.query("SELECT * FROM plans WHERE plan_id = ?", [pid])
    if rows.empty:
        return None
    r = rows.iloc[0]
    ranks = tuple(int(x) for x in str(r["ranks"]).split(",")) if isinstance(r["ranks"], str) and r["ranks"] else ()
    return PlanRef(pid, r["method"], float(r["budget"]), float(r["bits_per_param"]), float(r["objective"]),
                   r["table_key"], r["budget_kind"] if isinstance(r["budget_kind"], str) else "quantized", ranks)


def _frames(
    pid: str, model: str, method: str, refs: list[TableRef], budget: Budget, problem: Problem, values: pd.DataFrame,
    plan: Allocation, factor_bits: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    chosen = values.set_index(CANDIDATE).loc[plan.rows()].reset_index()
    picked = problem.table.set_index(CANDIDATE).loc[plan.rows()].reset_index()
    fig = figures(picked, problem.nontarget_bytes, factor_bits)
    head = pd.DataFrame(
        [
            {
                "plan_id": pid,
                "model": model,
                "method": method,
                "budget": float(budget.value),
                "table_key": refs[-1].table_key,
                "objective": plan.objective,
                "bound": plan.bound,
                "gap": plan.gap,
                "status": plan.status,
                "solve_s": plan.solve_s,
                "bits_per_param": fig.bits_quantized,
                "budget_kind": budget.kind,
                "ranks": ",".join(str(r.rank) for r in refs),
                "factor_bits": int(factor_bits),
                "bits_with_lowrank": fig.bits_with_lowrank,
                "total_bytes": int(fig.total_bytes),
            }
        ]
    )
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
                "rank": int(r.rank),
                "bits_per_param": float(r.bits_per_param),
                "error": float(r.error),
            }
        )
    return PLANS.validate(head), PLAN_ASSIGNMENTS.validate(pd.DataFrame(rows))


def _problem(
    ctx: StageContext, model: ModelHandle, tables: ErrorTableHandle, refs: list[TableRef], s: PlanSettings
) -> Problem:
    """The union of a method's tables; a zero-init method's rank is its LoRA rank. Rows
    priced on a higher rank's factors carry the confirmation margin for them."""
    method = get_method(refs[0].method)
    targets = recorded_targets(ctx, model.model)
    shapes = pd.DataFrame([(t.name, t.rows, t.cols) for t in targets], columns=["matrix", "rows", "cols"])
    parts = [
        load_table(ctx, ref).assign(
            rank=ref.rank if method.has_lowrank_init else tables.lq.rank,
            margin=row_margin(ref, s),
        )
        for ref in refs
    ]
    table = pd.concat(parts, ignore_index=True).merge(shapes, on="matrix", how="left")
    return Problem(table, nontarget_bytes(model.folder, targets))


def rank_sets(refs: list[TableRef], s: PlanSettings) -> list[list[TableRef]]:
    """The tables each plan chooses from: all of the method's ranks, and with
    `fixed_rank_plans` each nonzero rank alone as well, those first: the rank-allocated
    plan starts from every exact row they computed (`confirm_plan(known=...)`), so its
    exact error is never above theirs."""
    sets = [[r] for r in refs if r.rank > 0] if s.fixed_rank_plans and len(refs) > 1 else []
    return sets + [refs]


def run_planning(
    ctx: StageContext, tables: ErrorTableHandle, s: PlanSettings, model: ModelHandle
) -> PlanHandle:
    out = []
    by_method: dict[str, list[TableRef]] = {}
    for ref in tables.tables:
        by_method.setdefault(ref.method, []).append(ref)
    for method, method_refs in by_method.items():
        solve = get_method(method).allocation.solve
        lowrank = get_method(method).has_lowrank_init
        problem = None
        for refs in rank_sets(sorted(method_refs, key=lambda r: r.rank), s):
            margin = confirm_margin(refs, s)
            ranks = tuple(r.rank for r in refs) if len(method_refs) > 1 else ()
            for budget in s.budgets_for(method):
                pid = plan_id(refs, budget, margin, s)
                cached = _existing(ctx, pid)
                if cached is not None:
                    out.append(cached)
                    continue
                if problem is None:
                    problem = _problem(ctx, model, tables, method_refs, s)
                sub = problem.with_ranks([r.rank for r in refs]) if lowrank else problem
                table, cap = sub.for_budget(budget, s.factor_bits)
                what = f"{method} @ {budget.describe()}" + (f", ranks {list(ranks)}" if ranks else "")
                # a fixed-rank plan beside the rank-allocated one: a rank whose factors alone
                # outgrow the budget is no plan, not a failed run
                if len(refs) < len(method_refs) and (least := cheapest_bits(table)) > cap + 1e-12:
                    ctx.log(f"plan {what}: skipped, that rank alone cannot fit (its cheapest plan needs "
                            f"{least:.3f} bits/param against {cap:.3f})")
                    continue
                if margin is None:
                    plan, values = solve(table, cap), table
                else:
                    known = known_exact_rows(ctx, refs) if len(refs) > 1 else None
                    plan, values = _confirmed(ctx, model, tables, refs, table, cap, solve, margin, what, known)
                head, assignments = _frames(pid, tables.model, method, refs, budget, sub, values, plan, s.factor_bits)
                ctx.warehouse.replace_rows("plan_assignments", assignments, {"plan_id": pid})
                ctx.warehouse.upsert("plans", head, ["plan_id"])  # written last: marks the plan complete
                h = head.iloc[0]
                ctx.log(
                    f"plan {what}: {h.bits_per_param:.4f} bits/param quantized, {h.bits_with_lowrank:.4f} with "
                    f"the factors, {h.total_bytes / 1e6:.2f} MB in all; objective {plan.objective:.4g}, "
                    f"gap {plan.gap:.1e}, {plan.status}"
                )
                out.append(PlanRef(pid, method, float(budget.value), float(h.bits_per_param), plan.objective,
                                   refs[-1].table_key, budget.kind, ranks))
    return PlanHandle(tables.model, out, tables.lq)


def _confirmed(
    ctx: StageContext,
    model: ModelHandle,
    tables: ErrorTableHandle,
    refs: list[TableRef],
    table: pd.DataFrame,
    cap: float,
    solve: Solver,
    margin: float,
    what: str,
    known: dict | None = None,
) -> tuple[Allocation, pd.DataFrame]:
    start = time.perf_counter()

    def progress(round_: int, n_new: int, plan: Allocation) -> None:
        ctx.log(
            f"confirm {what}: round {round_}, {n_new} picks not yet exact "
            f"(optimistic objective {plan.objective:.4g}), {time.perf_counter() - start:.0f}s"
        )

    exact = exact_rows(ctx, model, refs, tables.lq)
    done = confirm_plan(table, cap, exact, solve, margin, progress, known)
    ctx.log(
        f"confirm {what}: every pick exact after {done.rounds} rounds, "
        f"{len(done.exact)} exact rows, {time.perf_counter() - start:.0f}s"
    )
    return done.plan, done.table


def plan_choices(ctx: StageContext, pid: str, default_rank: int) -> dict[str, tuple[QuantConfig, int]]:
    """{matrix: (config, rank)} of a stored plan (plans stored before ranks were
    chosen carry none: `default_rank`)."""
    rows = ctx.warehouse.query("SELECT matrix, config, rank FROM plan_assignments WHERE plan_id = ?", [pid])
    return {
        r.matrix: (QuantConfig.parse(r.config), default_rank if pd.isna(r.rank) else int(r.rank))
        for r in rows.itertuples()
    }
