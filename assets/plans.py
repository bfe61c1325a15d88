"""Asset `allocation_plan`: a config per matrix for each method and budget."""

import dagster as dg
from pydantic import Field

from assets.shared import BASE_MODELS, stage_context
from lqlora_dagster.pipeline.handles import ErrorTableHandle, ModelHandle, PlanHandle
from lqlora_dagster.pipeline.planning import PLAN_VERSION, run_planning
from lqlora_dagster.pipeline.settings import DEFAULT_CONFIRM_MARGIN, PlanSettings
from resources import ArtifactStoreResource, ComputeDevice, ModelSource, WarehouseResource


class PlanConfig(dg.Config):
    budgets: list[float] = Field(default=[3.25], description="target bits per parameter; one plan per budget")
    budgets_by_method: dict[str, list[float]] = Field(
        default={},
        description="budgets for particular methods instead of `budgets` (e.g. qlora: [3.13, 4.13] for NF3, NF4)",
    )

    confirm: bool = Field(
        default=True,
        description="on a fast error table, compute the exact error of every config a plan picks and "
        "re-solve until all its picks are exact (the plan's objective is then the realized error)",
    )
    confirm_margin: float = Field(
        default=DEFAULT_CONFIRM_MARGIN,
        description="confirmation: estimates not yet exact count as this fraction lower (higher: "
        "closer to the exhaustive plan, more exact rows to compute)",
    )

    def settings(self) -> PlanSettings:
        by_method = tuple((m, tuple(b)) for m, b in sorted(self.budgets_by_method.items()))
        return PlanSettings(tuple(self.budgets), by_method, self.confirm_margin if self.confirm else None)


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
    handle = run_planning(ctx, error_table, config.settings(), base_model)
    return dg.Output(
        handle,
        data_version=dg.DataVersion("-".join(p.plan_id for p in handle.plans)),
        metadata={
            "plans": dg.MetadataValue.md(
                "| method | budget | bits/param | objective |\n|---|---|---|---|\n"
                + "\n".join(
                    f"| {p.method} | {p.budget:g} | {p.bits_per_param:.4f} | {p.objective:.4g} |"
                    for p in handle.plans
                )
            ),
        },
    )


@dg.asset_check(
    asset=allocation_plan, description="Each plan meets its budget and assigns every matrix exactly once."
)
def plans_meet_budget(allocation_plan: PlanHandle, warehouse: WarehouseResource) -> dg.AssetCheckResult:
    w = warehouse.warehouse()
    problems = []
    n_matrices = int(
        w.query("SELECT count(*) AS n FROM matrices WHERE model = ?", [allocation_plan.model])["n"].iloc[0]
    )
    for p in allocation_plan.plans:
        r = w.query(
            "SELECT count(*) AS n, count(DISTINCT matrix) AS d, "
            "sum(a.bits_per_param * m.numel) / sum(m.numel) AS bits "
            "FROM plan_assignments a JOIN matrices m ON m.name = a.matrix AND m.model = ? WHERE plan_id = ?",
            [allocation_plan.model, p.plan_id],
        ).iloc[0]
        if not (int(r["n"]) == int(r["d"]) == n_matrices):
            problems.append(f"{p.method}@{p.budget:g}: {int(r['n'])} assignments for {n_matrices} matrices")
        if float(r["bits"]) > p.budget + 1e-9:
            problems.append(f"{p.method}@{p.budget:g}: {float(r['bits']):.4f} bits/param over budget")
    return dg.AssetCheckResult(passed=not problems, metadata={"problems": dg.MetadataValue.json(problems)})
