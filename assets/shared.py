"""Partitions and the glue every asset uses to build its stage context."""

import dagster as dg

from lqlora_dagster.pipeline.context import StageContext
from resources import ArtifactStoreResource, ComputeDevice, ModelSource, WarehouseResource

BASE_MODELS = dg.DynamicPartitionsDefinition(name="base_models")


def stage_context(
    context: dg.AssetExecutionContext | dg.OpExecutionContext,
    warehouse: WarehouseResource,
    artifacts: ArtifactStoreResource,
    models: ModelSource,
    compute: ComputeDevice,
) -> StageContext:
    wh = warehouse.warehouse()
    store = artifacts.store(wh)
    return StageContext(
        store=store,
        warehouse=wh,
        model_cache=models.cache(),
        checkpoints=store.root.parent / "checkpoints",
        device=compute.torch_device(),
        log=context.log.info,
    )
