"""Dagster resources: thin configurable wrappers over lqlora_dagster's store and loaders."""

from resources.artifact_io import ArtifactStoreResource, HandleIOManager
from resources.compute_device import ComputeDevice
from resources.model_source import ModelSource
from resources.warehouse_resource import WarehouseResource

__all__ = ["ArtifactStoreResource", "ComputeDevice", "HandleIOManager", "ModelSource", "WarehouseResource"]
