"""The one Dagster `Definitions` of the project: assets, checks, jobs, sensor,
schedule and resources, all rooted at LQLORA_HOME (default ./.lqlora)."""

import fcntl
import os
from pathlib import Path

import dagster as dg

from assets import (
    automation,
    calibration,
    comparison,
    decomposition,
    errors,
    evaluation,
    finetuning,
    models,
    plans,
)
from assets.automation import MAIN_JOB, build_stale_schedule, new_model_sensor
from assets.comparison import COMPARISON_JOB, comparison_run_config
from assets.shared import BASE_MODELS
from lqlora_dagster.pipeline.context import default_home
from lqlora_dagster.pipeline.handles import from_json
from resources import ArtifactStoreResource, ComputeDevice, HandleIOManager, ModelSource, WarehouseResource
from resources.executors import executor_named

STAGE_MODULES = [models, calibration, errors, plans, decomposition, finetuning, evaluation, comparison]
MAIN_ASSETS = [
    "base_model",
    "calibration_batches",
    "fisher_diagonals",
    "error_table",
    "allocation_plan",
    "decomposed_model",
    "finetuned_adapters",
    "evaluation",
]


def resources_at(home: Path, device: str = "auto") -> dict:
    home = Path(home)
    return {
        "warehouse": WarehouseResource(database=str(home / "lqlora.duckdb")),
        "artifacts": ArtifactStoreResource(root=str(home / "artifacts")),
        "models": ModelSource(cache_dir=str(home / "models"), inbox_dir=str(home / "inbox")),
        "compute": ComputeDevice(device=device),
        "io_manager": HandleIOManager(root=str(home / "handles")),
    }


def build_definitions(home: Path | None = None, executor: str = "multiprocess") -> dg.Definitions:
    assets = dg.load_assets_from_modules(STAGE_MODULES)
    checks = dg.load_asset_checks_from_modules(STAGE_MODULES)
    main_job = dg.define_asset_job(
        MAIN_JOB,
        selection=dg.AssetSelection.assets(*MAIN_ASSETS),
        partitions_def=BASE_MODELS,
        description="The whole LQ-LoRA graph for one base model: calibration to evaluation.",
    )
    comparison_job = dg.define_asset_job(
        COMPARISON_JOB,
        selection=dg.AssetSelection.assets(*MAIN_ASSETS, "comparison_report"),
        partitions_def=BASE_MODELS,
        config=comparison_run_config(),
        description="LQ-LoRA vs QLoRA, LoftQ and QLoRA-ILP at the paper's budgets on one model, "
        "with a short identical finetune, rendered as a table and plots (comparison_report).",
    )
    # the nightly schedule re-runs the main job, so only the main job's assets count as stale
    versions = {
        k: v
        for a in assets
        for k, v in a.code_versions_by_key.items()
        if v is not None and k.to_user_string() in MAIN_ASSETS
    }
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=[main_job, comparison_job],
        sensors=[new_model_sensor],
        schedules=[build_stale_schedule(versions)],
        resources=resources_at(home or default_home()),
        executor=executor_named(executor),
    )


defs = build_definitions(executor=os.environ.get("LQLORA_EXECUTOR", "multiprocess"))

__all__ = ["COMPARISON_JOB", "automation", "build_definitions", "comparison_run_config", "defs", "resources_at"]


# --- running from the CLI: the Dagster side of `lqlora register` and `lqlora run` ---


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
    return build_definitions(Path(home) if home else None, executor).resolve_job_def(job)


def reconstructable_main_job(home: Path | None = None, executor: str = "multiprocess", job: str = MAIN_JOB):
    return dg.build_reconstructable_job(
        "lqlora_dagster.definitions",
        "job_definition",
        reconstructable_args=(str(home) if home else None, executor, job),
    )


def run_main_job(model: str, run_config: dict, multiprocess: bool = True, job: str = MAIN_JOB) -> bool:
    """Run the main job (or `job`, e.g. the comparison) for one partition in the persistent
    instance (the UI shows the run afterwards). Returns whether the run succeeded."""
    with dg.DagsterInstance.get() as instance:
        if multiprocess:
            result = dg.execute_job(
                reconstructable_main_job(job=job),
                instance=instance,
                run_config=run_config,
                tags={"dagster/partition": model},
            )
            return result.success
        result = job_definition(job=job).execute_in_process(
            run_config=run_config, instance=instance, partition_key=model, raise_on_error=False
        )
        return result.success
