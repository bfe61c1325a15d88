"""Running jobs from the `lqlora` CLI: the Dagster instance under LQLORA_HOME, the
partitions, the run itself, and its event log turned into `RunEvent`s for the
terminal (`lqlora_dagster/run_display.py`)."""

import fcntl
import os
import signal
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from assets.shared import BASE_MODELS
from lqlora_dagster.errors import RunInterrupted
from lqlora_dagster.pipeline.handles import from_json
from lqlora_dagster.run_display import RunEvent

RUN_TAG = "lqlora/cli-run"
PROCESS_TAG = "lqlora/process"  # "<pid>:<start time>" of the CLI process that runs it
_INTERRUPTED = ("KeyboardInterrupt", "DagsterExecutionInterruptedError")
_ACTIVE = (dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING)


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


def _innermost_message(error) -> str:
    """The user's error, not Dagster's wrapper: the first error in the cause chain that
    Dagster did not raise (an LQLoRAInputError names what to do; its own cause, say a
    FileNotFoundError, says less), one message without its class name."""
    while (
        error is not None
        and error.cls_name
        and error.cls_name.startswith("Dagster")
        and error.cause is not None
    ):
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
        if _interrupt_in(event.event_specific_data.error):
            return RunEvent("STEP_STOPPED", stage)
        return RunEvent(kind, stage, error=_innermost_message(event.event_specific_data.error))
    if kind in ("STEP_START", "RUN_SUCCESS", "RUN_FAILURE"):
        return RunEvent(kind, stage if stage in stages else None)
    return None


def _watch(
    instance: dg.DagsterInstance,
    token: str,
    stages: set[str],
    show: Callable[[RunEvent], None],
    stop: threading.Event,
) -> None:
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


def _process_id(pid: int) -> str | None:
    """pid and start time (clock ticks since boot), so a reused pid is not taken for ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{pid}:{stat.rsplit(')', 1)[1].split()[19]}"


def fail_orphaned_runs(instance: dg.DagsterInstance | None = None) -> list[str]:
    """Runs the CLI started whose process is gone (killed with SIGKILL, the machine
    rebooted) stay STARTED forever; mark them failed. Runs of other launchers (the UI's
    daemon) carry no process tag and are theirs to monitor."""
    if instance is None:
        with dg.DagsterInstance.get() as current:
            return fail_orphaned_runs(current)
    failed = []
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=list(_ACTIVE))):
        run = record.dagster_run
        owner = run.tags.get(PROCESS_TAG)
        if owner is None or _process_id(int(owner.split(":")[0])) == owner:
            continue
        instance.report_run_failed(
            run,
            f"the lqlora process that ran it (pid {owner.split(':')[0]}) ended "
            "without finishing it; its finished stages are stored",
        )
        failed.append(run.run_id)
    return failed


def _interrupt_in(error) -> bool:
    """Whether an error (or one it was raised from) is an interrupt, not a failure."""
    while error is not None:
        if error.cls_name in _INTERRUPTED:
            return True
        error = error.cause
    return False


def _was_interrupted(instance: dg.DagsterInstance, token: str) -> bool:
    """Whether the run's steps ended by an interrupt rather than an error of their own."""
    runs = instance.get_run_records(filters=dg.RunsFilter(tags={RUN_TAG: token}), limit=1)
    if not runs:
        return False
    for record in instance.all_logs(runs[0].dagster_run.run_id):
        event = record.dagster_event
        if event is not None and _interrupt_in(getattr(event.event_specific_data, "error", None)):
            return True
        if event is not None and "interrupted all active child processes" in (record.user_message or ""):
            return True
    return False


def _mark_canceled(instance: dg.DagsterInstance, token: str) -> None:
    runs = instance.get_run_records(filters=dg.RunsFilter(tags={RUN_TAG: token}), limit=1)
    if runs and runs[0].dagster_run.status != dg.DagsterRunStatus.CANCELED:
        instance.report_run_canceled(runs[0].dagster_run, "interrupted by the user (Ctrl-C or SIGTERM)")


def run_job(
    model: str,
    run_config: dict,
    job,  # a dg.JobDefinition, or the reconstructable job `definitions.reconstructable_job` builds
    stages: list[str],
    show: Callable[[RunEvent], None],
) -> bool:
    """Run `job` for one partition in the persistent instance (the UI shows it later),
    showing its events as they come: a reconstructable job on its executor (step
    processes), a job definition in this process. Returns whether the run succeeded;
    raises `RunInterrupted` (the run marked canceled) when the user stopped it."""
    token = uuid.uuid4().hex
    tags = {
        "dagster/partition": model,
        RUN_TAG: token,
        PROCESS_TAG: _process_id(os.getpid()) or str(os.getpid()),
    }
    terminated = threading.Event()

    def on_sigterm(signum, frame) -> None:  # Dagster stops its steps on SIGINT: route SIGTERM there
        terminated.set()
        os.kill(os.getpid(), signal.SIGINT)

    with dg.DagsterInstance.get() as instance:
        fail_orphaned_runs(instance)
        stop = threading.Event()
        watcher = threading.Thread(
            target=_watch, args=(instance, token, set(stages), show, stop), daemon=True
        )
        watcher.start()
        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            if isinstance(job, dg.JobDefinition):
                result = job.execute_in_process(
                    run_config=run_config,
                    instance=instance,
                    partition_key=model,
                    raise_on_error=False,
                    tags=tags,
                )
            else:
                result = dg.execute_job(job, instance=instance, run_config=run_config, tags=tags)
        except KeyboardInterrupt:
            _mark_canceled(instance, token)
            raise RunInterrupted() from None
        finally:
            signal.signal(signal.SIGTERM, previous)
            stop.set()
            watcher.join(timeout=30)
        if not result.success and (terminated.is_set() or _was_interrupted(instance, token)):
            _mark_canceled(instance, token)
            raise RunInterrupted()
        return result.success
