"""Asset `task_data`: the datasets a run reads, so the lineage starts at the data."""

from assets.stage_asset import Produced, stage_asset
from lqlora_dagster.data.selection import PARTS
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.dataset_registry import DATA_VERSION, select_data
from lqlora_dagster.pipeline.handles import ModelHandle
from lqlora_dagster.pipeline.settings import DataSettings
from lqlora_dagster.store.keys import stable_key


@stage_asset("source", DATA_VERSION, {"duckdb"}, settings=DataSettings, measured=False)
def task_data(ctx: StageContext, settings: DataSettings, base_model: ModelHandle) -> Produced:
    """The run's datasets (DuckDB `datasets`, `lqlora data add`) and their calibration / train / val / eval parts; its data version is the files' checksums, so an edited file re-marks what reads it."""
    data = select_data(ctx.warehouse, base_model, settings, ctx.log)
    ids = {part: data.content_id(part) for part in PARTS}
    return Produced(
        data,
        stable_key(ids),
        [f"{data.task} data", data.describe()],
        {
            "task": data.task,
            **{part: f"{data.source(part)[0].name} ({data.source(part)[1]})" for part in PARTS},
            "train_rows": data.train.rows,
            "train_sha256": data.train.sha256,
        },
    )
