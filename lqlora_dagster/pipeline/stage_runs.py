"""DuckDB `stage_runs`: how long each stage took and how much memory it added, one row
per successful run of a stage, so a user can ask SQL which stage a larger model will
find expensive (`SELECT stage, seconds, added_mb FROM stage_runs WHERE model = ...`)."""

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

import pandas as pd

from lqlora_dagster.memory import PeakMemory
from lqlora_dagster.pipeline.context import StageContext


@contextmanager
def measured_stage(ctx: StageContext, stage: str, model: str) -> Iterator[PeakMemory]:
    """Time and peak memory of the block; recorded only when it finishes without error."""
    started = datetime.now(timezone.utc).replace(tzinfo=None)
    with PeakMemory(ctx.device) as memory:
        yield memory
    row = {
        "model": model,
        "stage": stage,
        "device": str(ctx.device),
        "started_at": started,
        "seconds": memory.seconds,
        "added_mb": memory.added_mb,
        "peak_mb": memory.peak_mb,
    }
    ctx.warehouse.upsert("stage_runs", pd.DataFrame([row]), ["model", "stage", "started_at"])
    ctx.log(f"{stage}: {memory.seconds:.1f} s, {memory.added_mb:,.0f} MB added at peak")
