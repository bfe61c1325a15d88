"""Assets `calibration_batches` and `fisher_diagonals`."""

import dagster as dg
import numpy as np

from assets.config import config_class
from assets.shared import BASE_MODELS, stage_context, summary
from lqlora_dagster.data.selection import TaskData
from lqlora_dagster.pipeline.calibration import (
    CALIBRATION_VERSION,
    FISHER_VERSION,
    run_calibration,
    run_fisher,
)
from lqlora_dagster.pipeline.handles import CalibrationHandle, FisherHandle, ModelHandle
from lqlora_dagster.pipeline.settings import CalibrationSettings
from lqlora_dagster.pipeline.stage_runs import measured_stage
from resources import ArtifactStoreResource, ComputeDevice, ModelSource, WarehouseResource

CalibrationConfig = config_class(CalibrationSettings)


@dg.asset(
    partitions_def=BASE_MODELS,
    group_name="calibration",
    code_version=CALIBRATION_VERSION,
    description="Tokenized calibration sequences (safetensors; DuckDB `calibration`).",
    kinds={"safetensors"},
)
def calibration_batches(
    context: dg.AssetExecutionContext,
    config: CalibrationConfig,
    base_model: ModelHandle,
    task_data: TaskData,
    warehouse: WarehouseResource,
    artifacts: ArtifactStoreResource,
    models: ModelSource,
    compute: ComputeDevice,
) -> dg.Output[CalibrationHandle]:
    ctx = stage_context(context, warehouse, artifacts, models, compute)
    with measured_stage(ctx, "calibration_batches", base_model.model):
        handle = run_calibration(ctx, base_model, task_data, config.settings())
    art = ctx.store.get("calibration_batches", handle.model, handle.key, verify=False)
    return dg.Output(
        handle,
        data_version=dg.DataVersion(handle.key),
        metadata={
            "path": dg.MetadataValue.path(str(art.path)),
            "bytes": art.nbytes,
            "sequences": handle.n_sequences,
            "seq_len": handle.seq_len,
            "summary": summary([f"{handle.n_sequences} sequences of {handle.seq_len} tokens"]),
        },
    )


@dg.asset(
    partitions_def=BASE_MODELS,
    group_name="calibration",
    code_version=FISHER_VERSION,
    description="Empirical Fisher diagonal of every target matrix (safetensors; stats in DuckDB `fisher_stats`).",
    kinds={"pytorch", "safetensors"},
)
def fisher_diagonals(
    context: dg.AssetExecutionContext,
    base_model: ModelHandle,
    calibration_batches: CalibrationHandle,
    warehouse: WarehouseResource,
    artifacts: ArtifactStoreResource,
    models: ModelSource,
    compute: ComputeDevice,
) -> dg.Output[FisherHandle]:
    ctx = stage_context(context, warehouse, artifacts, models, compute)
    with measured_stage(ctx, "fisher_diagonals", base_model.model):
        handle = run_fisher(ctx, base_model, calibration_batches)
    art = ctx.store.get("fisher_diagonals", handle.model, handle.key, verify=False)
    return dg.Output(
        handle,
        data_version=dg.DataVersion(handle.key),
        metadata={
            "path": dg.MetadataValue.path(str(art.path)),
            "bytes": art.nbytes,
            "matrices": handle.n_matrices,
            "summary": summary([f"{handle.n_matrices} matrices"]),
        },
    )


@dg.asset_check(
    asset=fisher_diagonals, description="Every target has a finite, non-negative, non-zero Fisher diagonal."
)
def fisher_is_sane(fisher_diagonals: FisherHandle, warehouse: WarehouseResource) -> dg.AssetCheckResult:
    stats = warehouse.warehouse().query(
        "SELECT mean, max FROM fisher_stats WHERE key = ?", [fisher_diagonals.key]
    )
    finite = bool(np.isfinite(stats[["mean", "max"]].to_numpy()).all())
    ok = len(stats) == fisher_diagonals.n_matrices and finite and bool((stats["mean"] > 0).all())
    return dg.AssetCheckResult(
        passed=ok,
        metadata={"matrices": len(stats), "min_mean": float(stats["mean"].min()) if len(stats) else 0.0},
    )
