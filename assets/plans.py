"""Asset `allocation_plan`: a config per matrix for each method and budget."""

import dagster as dg
import pandas as pd

from assets.config import config_class
from assets.shared import BASE_MODELS, stage_context, summary
from lqlora_dagster.pipeline.handles import ErrorTableHandle, ModelHandle, PlanHandle
from lqlora_dagster.pipeline.planning import PLAN_VERSION, run_planning
from lqlora_dagster.pipeline.settings import PlanSettings
from lqlora_dagster.pipeline.stage_runs import measured_stage
from resources import ArtifactStoreResource, ComputeDevice, ModelSource, WarehouseResource

PlanConfig = config_class(PlanSettings)


@dg.asset(
    partitions_def=BASE_MODELS,
    group_name="allocation",
    code_version=PLAN_VERSION,
    description="ILP (or uniform) bit allocation per method and budget (DuckDB `plans`, `plan_assignments`).",
    kinds={"duckdb"},
)
def allocation_plan(
    context: dg.AssetExecutionContext,
    config: PlanConfig,
    error_table: ErrorTableHandle,
    base_model: ModelHandle,
    warehouse: WarehouseResource,
    artifacts: ArtifactStoreResource,
    models: ModelSource,
    compute: ComputeDevice,
) -> dg.Output[PlanHandle]:
    ctx = stage_context(context, warehouse, artifacts, models, compute)
    with measured_stage(ctx, "allocation_plan", base_model.model):
        handle = run_planning(ctx, error_table, config.settings(), base_model)
    return dg.Output(
        handle,
        data_version=dg.DataVersion("-".join(p.plan_id for p in handle.plans)),
        metadata={
            "plans": dg.MetadataValue.md(
                "| method | budget | kind | ranks | bits/param (Q) | objective |\n|---|---|---|---|---|---|\n"
                + "\n".join(
                    f"| {p.method} | {p.budget:g} | {p.budget_kind} | {','.join(map(str, p.ranks))} | "
                    f"{p.bits_per_param:.4f} | {p.objective:.4g} |"
                    for p in handle.plans
                )
            ),
            "summary": summary(
                [f"{p.method} @ {p.budget:g}: {p.bits_per_param:.3f} bits/param, error {p.objective:.4g}" for p in handle.plans]
            ),
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
