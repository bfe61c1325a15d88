"""Asset `allocation_plan`: a config per matrix for each method and budget."""

import dagster as dg
import pandas as pd

from assets.stage_asset import Produced, stage_asset
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.handles import ErrorTableHandle, ModelHandle, PlanHandle
from lqlora_dagster.pipeline.planning import PLAN_VERSION, run_planning
from lqlora_dagster.pipeline.settings import PlanSettings
from resources import WarehouseResource


@stage_asset("allocation", PLAN_VERSION, {"duckdb"}, settings=PlanSettings)
def allocation_plan(
    ctx: StageContext, settings: PlanSettings, error_table: ErrorTableHandle, base_model: ModelHandle
) -> Produced:
    """ILP (or uniform) bit allocation per method and budget (DuckDB `plans`, `plan_assignments`)."""
    handle = run_planning(ctx, error_table, settings, base_model)
    table = "\n".join(
        f"| {p.method} | {p.budget:g} | {p.budget_kind} | {','.join(map(str, p.ranks))} | "
        f"{p.bits_per_param:.4f} | {p.objective:.4g} |"
        for p in handle.plans
    )
    return Produced(
        handle,
        "-".join(p.plan_id for p in handle.plans),
        [
            f"{p.method} @ {p.budget:g}: {p.bits_per_param:.3f} bits/param, error {p.objective:.4g}"
            for p in handle.plans
        ],
        {
            "plans": dg.MetadataValue.md(
                "| method | budget | kind | ranks | bits/param (Q) | objective |\n|---|---|---|---|---|---|\n"
                + table
            )
        },
    )


def _spent(recount: pd.Series, kind: str) -> float | None:
    """What a plan spends in its budget's kind. Only a "total" plan must carry total_bytes:
    plans stored before that column existed hold NULL there (read back as pandas NA)."""
    if kind == "quantized":
        return float(recount["bits"])
    if kind == "lowrank":
        return float(recount["bits"]) + float(recount["factor_bits"])
    return None if pd.isna(recount["total_bytes"]) else float(recount["total_bytes"])


@dg.asset_check(
    asset=allocation_plan,
    description="Each plan meets its budget, recounted from its assignments in the budget's kind, and assigns "
    "every matrix exactly once.",
)
def plans_meet_budget(allocation_plan: PlanHandle, warehouse: WarehouseResource) -> dg.AssetCheckResult:
    w = warehouse.warehouse()
    problems = []
    n_matrices = int(
        w.query("SELECT count(*) AS n FROM matrices WHERE model = ?", [allocation_plan.model])["n"].iloc[0]
    )
    for p in allocation_plan.plans:
        r = w.query(
            "SELECT count(*) AS n, count(DISTINCT a.matrix) AS d, "
            "sum(a.bits_per_param * m.numel) / sum(m.numel) AS bits, "
            "sum(coalesce(a.rank, 0) * (m.rows + m.cols) * coalesce(p.factor_bits, 16)) "
            "  / sum(m.numel) AS factor_bits, any_value(p.total_bytes) AS total_bytes "
            "FROM plan_assignments a JOIN matrices m ON m.name = a.matrix AND m.model = ? "
            "JOIN plans p ON p.plan_id = a.plan_id WHERE a.plan_id = ?",
            [allocation_plan.model, p.plan_id],
        ).iloc[0]
        if not (int(r["n"]) == int(r["d"]) == n_matrices):
            problems.append(f"{p.method}@{p.budget:g}: {int(r['n'])} assignments for {n_matrices} matrices")
        spent = _spent(r, p.budget_kind)
        if spent is None:
            problems.append(f"{p.method}@{p.budget:g} ({p.budget_kind}): no total size recorded")
        elif spent > p.budget * (1 + 1e-9):
            problems.append(f"{p.method}@{p.budget:g} ({p.budget_kind}): {spent:.4f} over budget")
    return dg.AssetCheckResult(passed=not problems, metadata={"problems": dg.MetadataValue.json(problems)})
