"""Rank as a decision and budgets that count everything, through the whole graph on the
tiny model: the plans say which kind they met and all three figures, the decomposition
realizes each matrix's rank (0: no factors), and training and evaluation run on it."""

import pytest

from assets.allocation_plan import plans_meet_budget
from lqlora_dagster.store.warehouse import Warehouse
from resources import WarehouseResource
from tests.conftest import registered_home
from tests.pipeline.conftest import tiny_settings
from tests.pipeline.test_materialize import MODEL, materialize

RANKS = (0, 2, 4, 8)  # rank 8's factors alone outgrow the budgets: its fixed-rank plans are skipped
BUDGET = 4.5  # bits/param of the targets, factors included
SIZE = "12.625MB"  # the tiny model: 12.58 MB of embeddings and norms, 73,728 target weights


@pytest.fixture(scope="module")
def ranked(tmp_path_factory, tiny_llama_folder):
    home = tmp_path_factory.mktemp("home")
    settings = tiny_settings(budgets=(BUDGET,), steps=2).override(
        error_table={"ranks": RANKS},
        allocation_plan={"budget_kind": "lowrank", "max_sizes": (SIZE,), "fixed_rank_plans": True},
    )
    with registered_home(home, {MODEL: tiny_llama_folder}) as (_, instance):
        result = materialize(home, settings.run_config(), instance)
        yield home, result


def test_plans_record_their_kind_and_all_three_figures(ranked):
    home, result = ranked
    assert result.success
    failed = [(c.check_name, c.metadata) for c in result.get_asset_check_evaluations() if not c.passed]
    assert not failed  # plans_meet_budget recounts each plan in its kind
    w = Warehouse(home / "lqlora.duckdb")
    plans = w.query(
        "SELECT p.*, sum(a.rank * (m.rows + m.cols) * 16) / sum(m.numel) AS factor_bits_per_param "
        "FROM plans p JOIN plan_assignments a USING (plan_id) JOIN matrices m ON m.name = a.matrix "
        "GROUP BY ALL ORDER BY budget_kind, ranks"
    )
    # per kind: the rank-allocated plan and one per nonzero rank alone that fits
    assert sorted(plans["ranks"]) == sorted(["0,2,4,8", "2", "4"] * 2)
    non_targets = 12584192  # bytes: what the tiny model stores besides its target weights
    for p in plans.itertuples():
        assert p.bits_with_lowrank == pytest.approx(p.bits_per_param + p.factor_bits_per_param)
        assert p.total_bytes == pytest.approx(non_targets + p.bits_with_lowrank * 73728 / 8, abs=1)
        if p.budget_kind == "lowrank":
            assert p.bits_with_lowrank <= BUDGET + 1e-9
        else:
            assert p.budget_kind == "total" and p.total_bytes <= 12.625e6


def test_the_rank_allocated_plan_is_no_worse_than_any_fixed_rank(ranked):
    """It searches a superset: at the same budget its exact objective is at most each
    fixed-rank plan's (every objective is exact: confirmed)."""
    home, _ = ranked
    plans = Warehouse(home / "lqlora.duckdb").query("SELECT budget_kind, ranks, objective FROM plans")
    for kind, group in plans.groupby("budget_kind"):
        allocated = float(group.loc[group["ranks"] == "0,2,4,8", "objective"].iloc[0])
        fixed = group.loc[group["ranks"] != "0,2,4,8", "objective"].astype(float)
        assert allocated <= fixed.min() * (1 + 1e-9), (kind, allocated, list(fixed))


def test_decomposition_realizes_each_matrix_rank_and_error(ranked):
    home, _ = ranked
    w = Warehouse(home / "lqlora.duckdb")
    both = w.query(
        "SELECT a.rank AS planned_rank, d.rank AS rank, a.error AS planned, d.error AS realized "
        "FROM plan_assignments a JOIN decompositions d USING (plan_id, matrix)"
    )
    assert len(both) > 0 and (both["planned_rank"] == both["rank"]).all()
    assert set(both["rank"]) <= set(RANKS)
    assert (abs(both["planned"] - both["realized"]) <= 1e-4 * both["planned"].abs() + 1e-6).all()


def test_models_with_rank_zero_layers_train_and_evaluate(ranked):
    home, _ = ranked
    w = Warehouse(home / "lqlora.duckdb")
    with_zero = w.query("SELECT DISTINCT plan_id FROM plan_assignments WHERE rank = 0")
    evals = w.query("SELECT plan_id, stage, perplexity FROM evaluations WHERE plan_id IS NOT NULL")
    trained = set(evals.loc[evals["stage"] == "after_finetune", "plan_id"])
    assert evals["perplexity"].between(1, 1e6).all()
    assert len(with_zero) > 0  # on 64-wide matrices factors cost a lot: the ILP drops some
    # every plan with factors somewhere was finetuned and scored; a plan of rank 0
    # everywhere has nothing to train
    factored = set(w.query("SELECT DISTINCT plan_id FROM plan_assignments WHERE rank > 0")["plan_id"])
    assert trained - {"reference"} == factored


def test_the_budget_check_reads_plans_stored_before_the_total_size_column(ranked):
    """Plans from a warehouse older than `plans.total_bytes` hold NULL there: the check
    recounts quantized and low-rank plans without it, and names a total plan that lacks it."""
    home, result = ranked
    handle = result.output_for_node("allocation_plan")
    w = Warehouse(home / "lqlora.duckdb")
    saved = w.query("SELECT plan_id, total_bytes FROM plans")
    resource = WarehouseResource(database=str(home / "lqlora.duckdb"))
    try:
        w.execute("UPDATE plans SET total_bytes = NULL WHERE budget_kind = 'lowrank'")
        assert plans_meet_budget(allocation_plan=handle, warehouse=resource).passed
        w.execute("UPDATE plans SET total_bytes = NULL")
        check = plans_meet_budget(allocation_plan=handle, warehouse=resource)
        assert not check.passed
        assert all("(total): no total size recorded" in p for p in check.metadata["problems"].data)
    finally:
        for row in saved.itertuples():
            w.execute("UPDATE plans SET total_bytes = ? WHERE plan_id = ?", [int(row.total_bytes), row.plan_id])
