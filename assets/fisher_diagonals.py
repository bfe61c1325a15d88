"""Assets `calibration_batches` and `fisher_diagonals`."""

import dagster as dg
import numpy as np

from assets.stage_asset import Produced, stage_asset
from lqlora_dagster.data.selection import TaskData
from lqlora_dagster.pipeline.calibration import (
    CALIBRATION_VERSION,
    FISHER_VERSION,
    run_calibration,
    run_fisher,
)
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.handles import CalibrationHandle, FisherHandle, ModelHandle
from lqlora_dagster.pipeline.settings import CalibrationSettings
from resources import WarehouseResource


@stage_asset("calibration", CALIBRATION_VERSION, {"safetensors"}, settings=CalibrationSettings)
def calibration_batches(
    ctx: StageContext, settings: CalibrationSettings, base_model: ModelHandle, task_data: TaskData
) -> Produced:
    """Tokenized calibration sequences (safetensors; DuckDB `calibration`)."""
    handle = run_calibration(ctx, base_model, task_data, settings)
    art = ctx.store.get("calibration_batches", handle.model, handle.key, verify=False)
    return Produced(
        handle,
        handle.key,
        [f"{handle.n_sequences} sequences of {handle.seq_len} tokens"],
        {
            "path": dg.MetadataValue.path(str(art.path)),
            "bytes": art.nbytes,
            "sequences": handle.n_sequences,
            "seq_len": handle.seq_len,
        },
    )


@stage_asset("calibration", FISHER_VERSION, {"pytorch", "safetensors"})
def fisher_diagonals(
    ctx: StageContext, base_model: ModelHandle, calibration_batches: CalibrationHandle
) -> Produced:
    """Empirical Fisher diagonal of every target matrix (safetensors; stats in DuckDB `fisher_stats`)."""
    handle = run_fisher(ctx, base_model, calibration_batches)
    art = ctx.store.get("fisher_diagonals", handle.model, handle.key, verify=False)
    return Produced(
        handle,
        handle.key,
        [f"{handle.n_matrices} matrices"],
        {"path": dg.MetadataValue.path(str(art.path)), "bytes": art.nbytes, "matrices": handle.n_matrices},
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
