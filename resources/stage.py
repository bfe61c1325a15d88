"""`StageResources`: the one resource a stage asset takes. It holds the warehouse, the
artifact store, the model cache and the compute device, and builds the pipeline's
`StageContext` from them, so no asset lists the four or assembles the context itself."""

import dagster as dg

from lqlora_dagster.pipeline.context import StageContext
from resources.artifact_io import ArtifactStoreResource
from resources.compute_device import ComputeDevice
from resources.model_source import ModelSource
from resources.warehouse_resource import WarehouseResource


class StageResources(dg.ConfigurableResource):
    warehouse: WarehouseResource
    artifacts: ArtifactStoreResource
    models: ModelSource
    compute: ComputeDevice

    def context(self, context: dg.AssetExecutionContext | dg.OpExecutionContext) -> StageContext:
        """Where a stage stores and finds results, its device, and its log (Dagster's)."""
        wh = self.warehouse.warehouse()
        store = self.artifacts.store(wh)
        store.on_damaged = context.log.warning
        return StageContext(
            store=store,
            warehouse=wh,
            model_cache=self.models.cache(),
            checkpoints=store.root.parent / "checkpoints",
            device=self.compute.torch_device(),
            log=context.log.info,
            cpu_workers=self.compute.threads,
        )
