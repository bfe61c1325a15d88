"""Asset `task_data`: the datasets a run reads, so the lineage starts at the data."""

import dagster as dg

from assets.config import config_class
from assets.shared import BASE_MODELS, stage_context, summary
from lqlora_dagster.data.selection import PARTS, TaskData
from lqlora_dagster.pipeline.datasets import DATA_VERSION, select_data
from lqlora_dagster.pipeline.handles import ModelHandle
from lqlora_dagster.pipeline.settings import DataSettings
from lqlora_dagster.store.keys import stable_key
from resources import ArtifactStoreResource, ComputeDevice, ModelSource, WarehouseResource

DataConfig = config_class(DataSettings)


@dg.asset(
    partitions_def=BASE_MODELS,
    group_name="source",
    code_version=DATA_VERSION,
    description="The run's datasets (DuckDB `datasets`, `lqlora data add`) and their calibration / train / "
    "val / eval parts; its data version is the files' checksums, so an edited file re-marks what reads it.",
    kinds={"duckdb"},
)
def task_data(
    context: dg.AssetExecutionContext,
    config: DataConfig,
    base_model: ModelHandle,
    warehouse: WarehouseResource,
    artifacts: ArtifactStoreResource,
    models: ModelSource,
    compute: ComputeDevice,
) -> dg.Output[TaskData]:
    ctx = stage_context(context, warehouse, artifacts, models, compute)
    data = select_data(ctx.warehouse, base_model, config.settings(), ctx.log)
    ids = {part: data.content_id(part) for part in PARTS}
    return dg.Output(
        data,
        data_version=dg.DataVersion(stable_key(ids)),
        metadata={
            "task": data.task,
            **{part: f"{data.source(part)[0].name} ({data.source(part)[1]})" for part in PARTS},
            "train_rows": data.train.rows,
            "train_sha256": data.train.sha256,
            "summary": summary([f"{data.task} data", data.describe()]),
        },
    )
