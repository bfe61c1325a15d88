"""Small run configs for materializing the graph on the tiny model (tests/conftest.py)."""

import dagster as dg

from lqlora_dagster.pipeline.settings import PipelineSettings

# every asset but the export (its own job, after the main one: tests/pipeline/test_exported_model.py)
MAIN_GRAPH = dg.AssetSelection.all() - dg.AssetSelection.assets("exported_model")


def tiny_settings(budgets=(3.0,), methods=("lqlora-fisher",), steps=3) -> PipelineSettings:
    return PipelineSettings().override(
        calibration_batches={"n_sequences": 4, "seq_len": 64},
        error_table={"methods": methods, "rank": 4, "grid": "reduced"},
        allocation_plan={"budgets": budgets},
        finetuned_adapters={"steps": steps, "batch_size": 2, "seq_len": 64},
        evaluation={"seq_len": 64, "n_windows": 4},
    )


def tiny_run_config(budgets=(3.0,), methods=("lqlora-fisher",), steps=3) -> dict:
    return tiny_settings(budgets, methods, steps).run_config()
