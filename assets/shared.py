"""Partitions and the glue every asset uses to build its stage context."""

import warnings

import dagster as dg

from lqlora_dagster.pipeline.context import StageContext
from resources import ArtifactStoreResource, ComputeDevice, ModelSource, WarehouseResource

BASE_MODELS = dg.DynamicPartitionsDefinition(name="base_models")

# Every asset reports a data version (its content key) on purpose, so Dagster can tell
# stale from fresh; the beta notice it prints for each one is noise in users' logs.
warnings.filterwarnings("ignore", message="Parameter `data_version`", category=dg.BetaWarning)


def stage_context(
    context: dg.AssetExecutionContext | dg.OpExecutionContext,
    warehouse: WarehouseResource,
    artifacts: ArtifactStoreResource,
    models: ModelSource,
    compute: ComputeDevice,
) -> StageContext:
    wh = warehouse.warehouse()
    store = artifacts.store(wh)
    store.on_damaged = context.log.warning
    return StageContext(
        store=store,
        warehouse=wh,
        model_cache=models.cache(),
        checkpoints=store.root.parent / "checkpoints",
        device=compute.torch_device(),
        log=context.log.info,
        cpu_workers=compute.threads,
    )


def summary(parts: list[str], limit: int = 3) -> str:
    """What an asset produced, in one line for the CLI ("a; b; c; and 4 more")."""
    shown = "; ".join(parts[:limit])
    return shown + (f"; and {len(parts) - limit} more" if len(parts) > limit else "")
