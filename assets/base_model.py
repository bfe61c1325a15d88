"""Asset `base_model`: the registered model, its target matrices and shapes."""

import dagster as dg

from assets.stage_asset import Produced, stage_asset
from lqlora_dagster.pipeline.base_model_stage import CODE_VERSION, run_base_model
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.handles import ModelHandle
from resources import WarehouseResource


@stage_asset("source", CODE_VERSION, {"pytorch", "duckdb"})
def base_model(ctx: StageContext, partition: str) -> Produced:
    """The registered base model: loadable folder, target matrices (DuckDB `matrices`)."""
    handle = run_base_model(ctx, partition)
    return Produced(
        handle,
        handle.key,
        [f"{handle.n_targets} target matrices, {handle.target_params / 1e6:.1f}M weights in them"],
        {
            "folder": dg.MetadataValue.path(handle.folder),
            "task": handle.task,
            "target_matrices": handle.n_targets,
            "target_params": handle.target_params,
            "key": handle.key,
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
