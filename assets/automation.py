"""The sensor that turns registered models into partitions, and the schedule that
re-runs partitions whose assets are stale (missing, or built by older code)."""

from pathlib import Path

import dagster as dg

from assets.shared import BASE_MODELS
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.models.inspect import inspect_targets
from lqlora_dagster.models.source import is_hf_folder
from lqlora_dagster.pipeline.registry import check_model_name, register_model, registered_models
from resources import ModelSource, WarehouseResource

MAIN_JOB = "main_job"


def register_inbox(models: ModelSource, warehouse: WarehouseResource, log) -> list[str]:
    """Register every HF folder dropped into the inbox (named after the folder)."""
    inbox: Path = models.inbox()
    added = []
    if not inbox.is_dir():
        return added
    known = {(r.model, r.source) for r in registered_models(warehouse.warehouse()).itertuples()}
    for folder in sorted(p for p in inbox.iterdir() if p.is_dir()):
        try:
            name = check_model_name(folder.name.lower())
            if not is_hf_folder(folder) or (name, str(folder.resolve())) in known:
                continue  # registered ones were read whole then, not again every tick
            summary = inspect_targets(str(folder), None, models.cache())  # as `lqlora register` checks
            if register_model(warehouse.warehouse(), name, str(folder)):
                log.info(f"inbox folder {folder} registered as {name!r}: " + "; ".join(summary.lines()))
                added.append(name)
        except LQLoRAInputError as err:
            log.warning(f"inbox folder {folder} not registered: {err}")
    return added


@dg.sensor(
    job_name=MAIN_JOB,
    minimum_interval_seconds=30,
    description="Adds a partition (and requests the main job) for each model registered in DuckDB "
    "`models` or dropped as an HF folder into the inbox.",
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def new_model_sensor(
    context: dg.SensorEvaluationContext, models: ModelSource, warehouse: WarehouseResource
) -> dg.SensorResult | dg.SkipReason:
    register_inbox(models, warehouse, context.log)
    registered = list(registered_models(warehouse.warehouse())["model"])
    known = set(context.instance.get_dynamic_partitions(BASE_MODELS.name))
    new = [m for m in registered if m not in known]
    if not new:
        return dg.SkipReason(f"no new models ({len(registered)} registered)")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=m, run_key=f"register-{m}") for m in new],
        dynamic_partitions_requests=[BASE_MODELS.build_add_request(new)],
    )


def stale_partitions(instance: dg.DagsterInstance, code_versions: dict[dg.AssetKey, str]) -> list[str]:
    """Partitions where some asset was never materialized or was built by other code."""
    stale = []
    for partition in instance.get_dynamic_partitions(BASE_MODELS.name):
        for key, version in code_versions.items():
            record = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
            ).records
            built = (
                record[0].event_log_entry.asset_materialization.tags.get("dagster/code_version")
                if record
                else None
            )
            if built != version:
                stale.append(partition)
                break
    return stale


def build_stale_schedule(code_versions: dict[dg.AssetKey, str]) -> dg.ScheduleDefinition:
    @dg.schedule(
        job_name=MAIN_JOB,
        cron_schedule="0 3 * * *",
        description="Nightly: re-runs the main job for every partition with stale assets.",
    )
    def stale_partitions_schedule(context: dg.ScheduleEvaluationContext):
        stale = stale_partitions(context.instance, code_versions)
        if not stale:
            return dg.SkipReason("every partition is up to date")
        day = (
            context.scheduled_execution_time.strftime("%Y-%m-%d")
            if context.scheduled_execution_time
            else "now"
        )
        return [dg.RunRequest(partition_key=p, run_key=f"stale-{p}-{day}") for p in stale]

    return stale_partitions_schedule
