"""The whole asset graph on a tiny model, materialized by Dagster into a temp home."""

import dagster as dg
import pytest

from lqlora_dagster.definitions import build_definitions, resources_at
from lqlora_dagster.pipeline.registry import register_model
from lqlora_dagster.store.warehouse import Warehouse
from tests.pipeline.conftest import tiny_run_config

MODEL = "tiny-llama"


@pytest.fixture()
def home(tmp_path, tiny_llama_folder, monkeypatch):
    monkeypatch.setenv("LQLORA_HOME", str(tmp_path))
    w = Warehouse(tmp_path / "lqlora.duckdb")
    w.init_schema()
    register_model(w, MODEL, str(tiny_llama_folder))
    return tmp_path


def materialize(home, run_config, instance, selection=None):
    defs = build_definitions(home)
    assets = [a for a in defs.assets]  # AssetsDefinitions
    checks = list(defs.asset_checks or [])
    return dg.materialize(
        assets + checks,
        instance=instance,
        partition_key=MODEL,
        resources=resources_at(home),
        run_config=run_config,
        selection=selection,
        raise_on_error=True,
    )


def started_steps(result) -> set[str]:
    return {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}


def test_whole_graph_on_tiny_model(home):
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("base_models", [MODEL])
        result = materialize(home, tiny_run_config(), instance)
        assert result.success
        checks = result.get_asset_check_evaluations()
        assert checks and all(c.passed for c in checks if c.severity == dg.AssetCheckSeverity.ERROR), [
            (c.check_name, c.metadata) for c in checks if not c.passed
        ]
    w = Warehouse(home / "lqlora.duckdb")
    for table in (
        "matrices",
        "quant_errors",
        "plans",
        "plan_assignments",
        "decompositions",
        "train_steps",
        "evaluations",
    ):
        assert int(w.query(f"SELECT count(*) AS n FROM {table}")["n"].iloc[0]) > 0, table
    plans = w.query("SELECT budget, bits_per_param, status FROM plans")
    assert (plans["bits_per_param"] <= plans["budget"]).all() and set(plans["status"]) == {"optimal"}
    evals = w.query("SELECT stage, perplexity FROM evaluations ORDER BY stage")
    assert set(evals["stage"]) == {"reference", "before_finetune", "after_finetune"}
    assert evals["perplexity"].between(1, 1e6).all()
