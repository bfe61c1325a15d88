"""Asset `base_model`: the registered model, its target matrices and shapes."""

import dagster as dg

from assets.shared import BASE_MODELS, stage_context, summary
from lqlora_dagster.pipeline.base_model import CODE_VERSION, run_base_model
from lqlora_dagster.pipeline.handles import ModelHandle
from lqlora_dagster.pipeline.stage_runs import measured_stage
from resources import ArtifactStoreResource, ComputeDevice, ModelSource, WarehouseResource


@dg.asset(
    partitions_def=BASE_MODELS,
    group_name="source",
    code_version=CODE_VERSION,
    description="The registered base model: loadable folder, target matrices (DuckDB `matrices`).",
    kinds={"pytorch", "duckdb"},
)
def base_model(
    context: dg.AssetExecutionContext,
    warehouse: WarehouseResource,
    artifacts: ArtifactStoreResource,
    models: ModelSource,
    compute: ComputeDevice,
) -> dg.Output[ModelHandle]:
    ctx = stage_context(context, warehouse, artifacts, models, compute)
    with measured_stage(ctx, "base_model", context.partition_key):
        handle = run_base_model(ctx, context.partition_key)
    return dg.Output(
        handle,
        data_version=dg.DataVersion(handle.key),
        metadata={
            "folder": dg.MetadataValue.path(handle.folder),
            "task": handle.task,
            "target_matrices": handle.n_targets,
            "target_params": handle.target_params,
            "key": handle.key,
            "summary": summary([f"{handle.n_targets} target matrices, {handle.target_params / 1e6:.1f}M weights in them"]),
        },
    )


@dg.asset_check(asset=base_model, description="Targets were found and all are recorded in DuckDB `matrices`.")
def targets_recorded(base_model: ModelHandle, warehouse: WarehouseResource) -> dg.AssetCheckResult:
    rows = warehouse.warehouse().query(
        "SELECT count(*) AS n FROM matrices WHERE model = ?", [base_model.model]
    )
    n = int(rows["n"].iloc[0])
    return dg.AssetCheckResult(
        passed=n == base_model.n_targets > 0, metadata={"rows": n, "targets": base_model.n_targets}
    )
