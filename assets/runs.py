"""Running jobs from the `lqlora` CLI: the Dagster instance under LQLORA_HOME, the
partitions, the run itself, and its event log turned into `RunEvent`s for the
terminal (`lqlora_dagster/run_display.py`)."""

import fcntl
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from assets.automation import MAIN_JOB
from assets.shared import BASE_MODELS
from lqlora_dagster.pipeline.handles import from_json
from lqlora_dagster.run_display import RunEvent

RUN_TAG = "lqlora/cli-run"


def prepare_dagster_home(home: Path) -> Path:
    """DAGSTER_HOME under LQLORA_HOME, with telemetry and the first-run modal off, and its
    storage created once under a file lock: two runs started together on a fresh home
    would otherwise race to create the same SQLite schema (alembic "more than one head")."""
    dagster_home = Path(os.environ.get("DAGSTER_HOME") or Path(home) / "dagster")
    dagster_home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    ready = dagster_home / ".storage-ready"
    if ready.exists():
        return dagster_home
    with open(dagster_home / ".init.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready.exists():
            config = dagster_home / "dagster.yaml"
            if not config.exists():
                config.write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
            with dg.DagsterInstance.get():  # creates and migrates the storage
                pass
            ready.touch()
    return dagster_home


def stored_handle(home: Path, asset: str, model: str):
    """The handle an asset last stored for a partition (what the IO manager hands downstream)."""
    return from_json((Path(home) / "handles" / asset / f"{model}.json").read_text())


def add_partition(model: str) -> None:
    with dg.DagsterInstance.get() as instance:
        if not instance.has_dynamic_partition(BASE_MODELS.name, model):
            instance.add_dynamic_partitions(BASE_MODELS.name, [model])


def remove_partition(model: str) -> None:
    with dg.DagsterInstance.get() as instance:
        if instance.has_dynamic_partition(BASE_MODELS.name, model):
            instance.delete_dynamic_partition(BASE_MODELS.name, model)


def job_definition(home: str | None = None, executor: str = "multiprocess", job: str = MAIN_JOB) -> dg.JobDefinition:
    """Module-level factory so other processes (multiprocess steps, Dask workers) can
    reconstruct the job from its arguments."""
    from lqlora_dagster.definitions import build_definitions

    return build_definitions(Path(home) if home else None, executor).resolve_job_def(job)


def reconstructable_job(home: Path | None = None, executor: str = "multiprocess", job: str = MAIN_JOB):
    return dg.build_reconstructable_job(
        "assets.runs", "job_definition", reconstructable_args=(str(home) if home else None, executor, job)
    )


def _innermost_message(error) -> str:
    """The user's error, not Dagster's wrapper: the first error in the cause chain that
    Dagster did not raise (an LQLoRAInputError names what to do; its own cause, say a
    FileNotFoundError, says less), one message without its class name."""
    while error is not None and error.cls_name and error.cls_name.startswith("Dagster") and error.cause is not None:
        error = error.cause
    if error is None:
        return "unknown error"
    text = error.message.strip()
    head, sep, rest = text.partition(": ")
    return rest if sep and head.rsplit(".", 1)[-1] == error.cls_name else text


def _as_event(record, stages: set[str]) -> RunEvent | None:
    entry = record.event_log_entry
    stage = entry.step_key.split(".")[0] if entry.step_key else None
    event = entry.dagster_event
    if event is None:
        return RunEvent("LOG", stage if stage in stages else None, entry.user_message)
    kind = event.event_type_value
    if kind == "ASSET_MATERIALIZATION":
        materialization = event.event_specific_data.materialization
        stage = materialization.asset_key.to_user_string()
        summary = materialization.metadata.get("summary")
        return RunEvent(kind, stage, summary=summary.value if summary is not None else "")
    if kind == "STEP_FAILURE":
        return RunEvent(kind, stage, error=_innermost_message(event.event_specific_data.error))
    if kind in ("STEP_START", "RUN_SUCCESS", "RUN_FAILURE"):
        return RunEvent(kind, stage if stage in stages else None)
    return None


def _watch(instance: dg.DagsterInstance, token: str, stages: set[str], show: Callable[[RunEvent], None],
           stop: threading.Event) -> None:
    """Poll the run's event log (written by every step process) and show its events."""
    run_id, cursor = None, None
    while True:
        finished = stop.is_set()
        if run_id is None:
            runs = instance.get_run_records(filters=dg.RunsFilter(tags={RUN_TAG: token}), limit=1)
            run_id = runs[0].dagster_run.run_id if runs else None
        if run_id is not None:
            while True:
                page = instance.get_records_for_run(run_id, cursor=cursor, limit=500)
                for record in page.records:
                    event = _as_event(record, stages)
                    if event is not None:
                        show(event)
                cursor = page.cursor
                if not page.has_more:
                    break
        if finished:
            return
        stop.wait(0.5)


def run_job(
    model: str,
    run_config: dict,
    job: str,
    stages: list[str],
    show: Callable[[RunEvent], None],
    multiprocess: bool = True,
) -> bool:
    """Run `job` for one partition in the persistent instance (the UI shows it later),
    showing its events as they come. Returns whether the run succeeded."""
    token = uuid.uuid4().hex
    tags = {"dagster/partition": model, RUN_TAG: token}
    with dg.DagsterInstance.get() as instance:
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(instance, token, set(stages), show, stop), daemon=True)
        watcher.start()
        try:
            if multiprocess:
                result = dg.execute_job(reconstructable_job(job=job), instance=instance, run_config=run_config, tags=tags)
            else:
                result = job_definition(job=job).execute_in_process(
                    run_config=run_config, instance=instance, partition_key=model, raise_on_error=False, tags=tags
                )
        finally:
            stop.set()
            watcher.join(timeout=30)
        return result.success
