"""The whole asset graph on a tiny model, materialized by Dagster into a temp home;
then caching: re-materializing recomputes nothing, a new budget only the plan onward."""

from pathlib import Path

import dagster as dg
import pytest

from lqlora_dagster.definitions import build_definitions, resources_at
from lqlora_dagster.store.warehouse import Warehouse
from tests.conftest import registered_home
from tests.pipeline.conftest import MAIN_GRAPH, tiny_run_config

MODEL = "tiny-llama"
TABLES = ("matrices", "quant_errors", "plans", "plan_assignments", "decompositions", "train_steps", "evaluations")


def materialize(home: Path, run_config: dict, instance: dg.DagsterInstance,
                partition: str = MODEL) -> dg.ExecuteInProcessResult:
    defs = build_definitions(home)
    return dg.materialize(
        list(defs.assets) + list(defs.asset_checks or []),
        instance=instance,
        partition_key=partition,
        resources=resources_at(home),
        run_config=run_config,
        selection=MAIN_GRAPH,
        raise_on_error=True,
    )


def artifact_mtimes(home: Path) -> dict[str, int]:
    return {str(p.relative_to(home)): p.stat().st_mtime_ns for p in (home / "artifacts").rglob("*") if p.is_file()}


def counts(home: Path) -> dict[str, int]:
    w = Warehouse(home / "lqlora.duckdb")
    return {t: int(w.query(f"SELECT count(*) AS n FROM {t}")["n"].iloc[0]) for t in TABLES}


def rows_by_key(home: Path) -> dict[str, int]:
    rows = Warehouse(home / "lqlora.duckdb").query("SELECT table_key, count(*) AS n FROM quant_errors GROUP BY 1")
    return dict(zip(rows["table_key"], rows["n"].astype(int)))


@pytest.fixture(scope="module")
def populated(tmp_path_factory, tiny_llama_folder):
    """One full materialization in a fresh home; yields (home, instance, result)."""
    home = tmp_path_factory.mktemp("home")
    with registered_home(home, {MODEL: tiny_llama_folder}) as (w, instance):
        result = materialize(home, tiny_run_config(), instance)
        yield home, instance, result


def test_whole_graph_on_tiny_model(populated):
    home, _, result = populated
    assert result.success
    failed = [(c.check_name, c.metadata) for c in result.get_asset_check_evaluations()
              if not c.passed and c.severity == dg.AssetCheckSeverity.ERROR]
    assert not failed
    n = counts(home)
    assert all(v > 0 for v in n.values()), n
    w = Warehouse(home / "lqlora.duckdb")
    plans = w.query("SELECT budget, bits_per_param, status FROM plans")
    assert (plans["bits_per_param"] <= plans["budget"]).all() and set(plans["status"]) == {"optimal"}
    evals = w.query("SELECT stage, perplexity FROM evaluations")
    assert set(evals["stage"]) == {"reference", "before_finetune", "after_finetune"}
    assert evals["perplexity"].between(1, 1e6).all()
    assigned = w.query("SELECT count(DISTINCT matrix) AS n FROM plan_assignments")["n"].iloc[0]
    assert assigned == n["matrices"]


def test_plans_state_the_error_the_decomposition_realizes(populated):
    """The plan was made on the fast table and confirmed: every pick's error is the
    exact one (a cold-start decomposition), which is what the decomposition stage
    then realizes for that matrix, to float rounding."""
    home, _, _ = populated
    both = Warehouse(home / "lqlora.duckdb").query(
        "SELECT a.matrix, a.error AS planned, d.error AS realized "
        "FROM plan_assignments a JOIN decompositions d USING (plan_id, matrix)"
    )
    assert len(both) == counts(home)["matrices"]
    assert ((both["planned"] - both["realized"]).abs() <= 1e-6 * both["realized"]).all(), both


def test_decomposed_model_stores_the_bits_its_plan_counts(populated):
    """The plan, its budget check and the stored artifact count the same bits: padding and
    each packed matrix's 32-bit header (on the tiny model the header alone is 0.006
    bits/param, which the plan once left out)."""
    home, _, _ = populated
    both = Warehouse(home / "lqlora.duckdb").query(
        "SELECT p.budget, p.bits_per_param AS planned, e.bits_per_param AS stored "
        "FROM plans p JOIN evaluations e USING (plan_id) WHERE e.stage = 'before_finetune'"
    )
    assert not both.empty
    assert ((both["planned"] - both["stored"]).abs() < 1e-9).all(), both
    assert (both["stored"] <= both["budget"] + 1e-12).all(), both


def test_rematerializing_recomputes_nothing(populated):
    home, instance, _ = populated
    before_files, before_rows = artifact_mtimes(home), counts(home)
    result = materialize(home, tiny_run_config(), instance)
    assert result.success
    assert artifact_mtimes(home) == before_files  # no artifact rewritten
    assert counts(home) == before_rows
    logs = [e.user_message for e in instance.all_logs(result.run_id) if e.user_message]
    assert any("0 new rows" in m for m in logs) and not any(m.endswith("new rows") and not m.endswith(" 0 new rows") for m in logs)
    assert any("cached" in m and "fisher" in m for m in logs)


def test_new_budget_recomputes_only_the_plan_and_after(populated):
    home, instance, _ = populated
    before_files, before_rows, before_keys = artifact_mtimes(home), counts(home), rows_by_key(home)
    result = materialize(home, tiny_run_config(budgets=(2.75,)), instance)
    assert result.success
    after_files, after_rows = artifact_mtimes(home), counts(home)
    for stage in ("calibration_batches", "fisher_diagonals"):
        same = {k: v for k, v in after_files.items() if k.startswith(f"artifacts/{stage}/")}
        assert same == {k: v for k, v in before_files.items() if k.startswith(f"artifacts/{stage}/")}
    # the fast table is reused as it is; only the new plan's confirmation adds exact rows
    fast_keys = set(Warehouse(home / "lqlora.duckdb").query("SELECT DISTINCT table_key FROM plans")["table_key"])
    assert {k: before_keys[k] for k in fast_keys} == {k: rows_by_key(home)[k] for k in fast_keys}
    assert after_rows["quant_errors"] - before_rows["quant_errors"] <= after_rows["matrices"] * 24
    assert after_rows["plans"] == before_rows["plans"] + 1
    new = set(after_files) - set(before_files)
    assert any(k.startswith("artifacts/decomposed_model/") for k in new)
    assert any(k.startswith("artifacts/finetuned_adapters/") for k in new)
    assert after_rows["evaluations"] == before_rows["evaluations"] + 2  # before and after finetune


@pytest.mark.parametrize(
    "query", ["ppl_by_method_and_budget", "error_vs_bits", "best_config_per_layer_type", "ilp_bits_by_layer"]
)
def test_canned_queries_on_populated_db(populated, query):
    home, _, _ = populated
    frame = Warehouse(home / "lqlora.duckdb").run_named_query(query, {"model": MODEL})
    assert len(frame) > 0
    if query == "ppl_by_method_and_budget":
        assert {"reference", "before_finetune", "after_finetune"} <= set(frame["stage"])
    if query == "ilp_bits_by_layer":
        assert set(frame["layer"]) == {0, 1} and frame["bits_per_param"].gt(2).all()
    if query == "error_vs_bits":
        assert frame["relative_error"].min() == 1.0
    if query == "best_config_per_layer_type":
        assert set(frame["kind"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_every_stage_records_its_time_and_memory(populated):
    home, _, _ = populated
    w = Warehouse(home / "lqlora.duckdb")
    runs = w.query("SELECT stage, seconds, added_mb, peak_mb FROM stage_runs WHERE model = ?", [MODEL])
    stages = {"base_model", "calibration_batches", "fisher_diagonals", "allocation_plan", "decomposed_model",
              "finetuned_adapters", "evaluation"}
    assert stages <= set(runs["stage"]), set(runs["stage"])
    assert any(s.startswith("error_table_chunk_") for s in runs["stage"])
    assert (runs["seconds"] > 0).all() and (runs["peak_mb"] >= runs["added_mb"]).all() and (runs["added_mb"] >= 0).all()
    assert w.query("SELECT peak_mb FROM evaluations")["peak_mb"].notna().all()
