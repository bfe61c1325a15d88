"""The one Dagster `Definitions` of the project: assets, checks, jobs, sensor,
schedule and resources, all rooted at LQLORA_HOME (default ./.lqlora)."""

import os
from pathlib import Path

import dagster as dg

import assets.allocation_plan
import assets.base_model
import assets.comparison_report
import assets.decomposed_model
import assets.error_table
import assets.evaluation
import assets.exported_model
import assets.finetuned_adapters
import assets.fisher_diagonals
import assets.task_data
from assets.automation import MAIN_JOB, build_stale_schedule, new_model_sensor
from assets.comparison_report import COMPARISON_JOB, comparison_run_config
from assets.exported_model import EXPORT_JOB
from assets.shared import BASE_MODELS
from lqlora_dagster.pipeline.context import default_home
from resources import ArtifactStoreResource, ComputeDevice, HandleIOManager, ModelSource, WarehouseResource
from resources.executors import executor_named
from resources.stage import StageResources

STAGE_MODULES = [
    assets.base_model,
    assets.task_data,
    assets.fisher_diagonals,
    assets.error_table,
    assets.allocation_plan,
    assets.decomposed_model,
    assets.finetuned_adapters,
    assets.evaluation,
    assets.comparison_report,
    assets.exported_model,
]
MAIN_ASSETS = [
    "base_model",
    "task_data",
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
    found = {
        "warehouse": WarehouseResource(database=str(home / "lqlora.duckdb")),
        "artifacts": ArtifactStoreResource(root=str(home / "artifacts")),
        "models": ModelSource(cache_dir=str(home / "models"), inbox_dir=str(home / "inbox")),
        "compute": ComputeDevice(device=device),
        "io_manager": HandleIOManager(root=str(home / "handles")),
    }
    found["stage"] = StageResources(
        warehouse=found["warehouse"], artifacts=found["artifacts"], models=found["models"], compute=found["compute"]
    )
    return found


def build_definitions(home: Path | None = None, executor: str = "multiprocess") -> dg.Definitions:
    stage_assets = dg.load_assets_from_modules(STAGE_MODULES)
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
    export_job = dg.define_asset_job(
        EXPORT_JOB,
        selection=dg.AssetSelection.assets("exported_model"),
        partitions_def=BASE_MODELS,
        description="Write a finetuned model for llama.cpp (GGUF), transformers (merged) or PEFT, and score it "
        "there (after the main job).",
    )
    # the nightly schedule re-runs the main job, so only the main job's assets count as stale
    versions = {
        k: v
        for a in stage_assets
        for k, v in a.code_versions_by_key.items()
        if v is not None and k.to_user_string() in MAIN_ASSETS
    }
    return dg.Definitions(
        assets=stage_assets,
        asset_checks=checks,
        jobs=[main_job, comparison_job, export_job],
        sensors=[new_model_sensor],
        schedules=[build_stale_schedule(versions)],
        resources=resources_at(home or default_home()),
        executor=executor_named(executor),
    )


def job_definition(home: str | None = None, executor: str = "multiprocess", job: str = MAIN_JOB) -> dg.JobDefinition:
    """Module-level factory so other processes (multiprocess steps, Dask workers) can
    reconstruct the job from its arguments."""
    return build_definitions(Path(home) if home else None, executor).resolve_job_def(job)


def reconstructable_job(home: Path | None = None, executor: str = "multiprocess", job: str = MAIN_JOB):
    return dg.build_reconstructable_job(
        "lqlora_dagster.definitions", "job_definition", reconstructable_args=(str(home) if home else None, executor, job)
    )


defs = build_definitions(executor=os.environ.get("LQLORA_EXECUTOR", "multiprocess"))

__all__ = [
    "COMPARISON_JOB",
    "EXPORT_JOB",
    "MAIN_ASSETS",
    "MAIN_JOB",
    "build_definitions",
    "comparison_run_config",
    "defs",
    "job_definition",
    "reconstructable_job",
    "resources_at",
]
