"""Dagster resources: thin configurable wrappers over lqlora_dagster's store and loaders."""

from resources.artifact_io import ArtifactStoreResource, HandleIOManager
from resources.compute import ComputeDevice
from resources.model_source import ModelSource
from resources.warehouse import WarehouseResource

__all__ = ["ArtifactStoreResource", "ComputeDevice", "HandleIOManager", "ModelSource", "WarehouseResource"]
