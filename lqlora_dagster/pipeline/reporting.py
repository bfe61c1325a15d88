"""Stage `comparison_report`: the evaluation rows of a run as a markdown table and two
plots, stored as one artifact (content-keyed by the rows and the plan it draws)."""

from pathlib import Path

import pandas as pd

from lqlora_dagster.methods import get_method
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.evaluating import evaluation_table
from lqlora_dagster.pipeline.handles import EvaluationHandle, PlanHandle, PlanRef, ReportHandle
from lqlora_dagster.report import (
    allocation_grid,
    comparison_frame,
    heatmap_figure,
    markdown_table,
    pareto_figure,
    save_png,
)
from lqlora_dagster.store.keys import stable_key

REPORT_VERSION = "4"
HEATMAP_PLAN = ("lqlora-fisher", 3.0)  # the plan whose bits per matrix the heatmap shows
ASSET = "comparison_report"
TABLE, PARETO, HEATMAP, RANKS = "comparison.md", "pareto.png", "allocation.png", "allocation_rank.png"


def heatmap_plan(plans: PlanHandle, wanted: tuple[str, float] = HEATMAP_PLAN) -> PlanRef | None:
    """The wanted (method, budget) plan if the run made it, else its first ILP plan;
    among those, one that chose ranks first."""
    ilp = sorted((p for p in plans.plans if get_method(p.method).ilp), key=lambda p: len(p.ranks) < 2)
    exact = [p for p in ilp if p.method == wanted[0] and abs(p.budget - wanted[1]) < 1e-9]
    return (exact or ilp or [None])[0]


def plan_allocation(ctx: StageContext, model: str, plan_id: str) -> pd.DataFrame:
    return ctx.warehouse.query(
        "SELECT m.layer, a.matrix, m.position, a.bits_per_param, a.rank FROM plan_assignments a "
        "JOIN matrices m ON m.model = ? AND m.name = a.matrix WHERE a.plan_id = ?",
        [model, plan_id],
    )


def run_report(ctx: StageContext, evaluation: EvaluationHandle, plans: PlanHandle) -> ReportHandle:
    plan = heatmap_plan(plans)
    key = stable_key(sorted(evaluation.eval_keys), plan.plan_id if plan else None, REPORT_VERSION)
    files = [TABLE, PARETO] + ([HEATMAP] if plan else []) + ([RANKS] if plan and len(plan.ranks) > 1 else [])
    if ctx.store.find(ASSET, evaluation.model, key) is not None:
        ctx.log("comparison report: cached")
        return ReportHandle(evaluation.model, key, files, plan.plan_id if plan else None)
    frame = comparison_frame(evaluation_table(ctx, evaluation.eval_keys))

    def write(folder: Path) -> None:
        (folder / TABLE).write_text(markdown_table(frame) + "\n")
        metric = frame.attrs["metric"]
        save_png(pareto_figure(frame, f"{evaluation.model}: {metric} vs memory"), folder / PARETO)
        if plan is not None:
            rows = plan_allocation(ctx, evaluation.model, plan.plan_id)
            size = f"{plan.budget / 1e6:g} MB" if plan.budget_kind == "total" else f"{plan.budget:g} bits"
            what = f"{plan.method} @ {size}"
            save_png(heatmap_figure(allocation_grid(rows), f"{what}: bits/param per matrix"), folder / HEATMAP)
            if RANKS in files:
                grid = allocation_grid(rows.fillna({"rank": 0}), "rank")
                save_png(heatmap_figure(grid, f"{what}: rank per matrix", "rank of L1 L2"), folder / RANKS)

    ctx.store.save_folder(ASSET, evaluation.model, key, write)
    ctx.log(f"comparison report: {len(frame)} rows, {len(files)} files")
    return ReportHandle(evaluation.model, key, files, plan.plan_id if plan else None)


def report_folder(ctx: StageContext, handle: ReportHandle) -> Path:
    return ctx.store.get(ASSET, handle.model, handle.key).path
