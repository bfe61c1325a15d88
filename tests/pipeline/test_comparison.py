"""The comparison job on the tiny model (reduced grid, a few steps), and the report it
renders: the table's rows, and plots whose axes carry the evaluation numbers."""

import dataclasses

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from assets.runs import stored_handle
from lqlora_dagster.comparison import LM_COMPARISON, RANK_COMPARISON
from lqlora_dagster.definitions import COMPARISON_JOB, build_definitions, comparison_run_config
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.report import (
    allocation_grid,
    comparison_frame,
    heatmap_figure,
    markdown_table,
    pareto_figure,
)
from tests.conftest import registered_home

MODEL = "tiny-llama"
TINY = dataclasses.replace(
    LM_COMPARISON.with_stages(
        error_table={"rank": 4, "grid": "reduced"},
        calibration_batches={"n_sequences": 4, "seq_len": 64},
        finetuned_adapters={"steps": 2, "batch_size": 2, "seq_len": 64},
        evaluation={"n_windows": 2, "seq_len": 64},
    ),
    uniform_budgets=(3.6, 4.6),  # 64-wide matrices pad a whole scale group: NF3 = 3.51 bits here
)
BUDGETS, FINETUNED_BUDGETS = TINY.budgets, TINY.finetuned_budgets
ILP_METHODS, UNIFORM_METHODS = TINY.ilp_methods, TINY.uniform_methods
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_llama_folder):
    home = tmp_path_factory.mktemp("compare-home")
    with registered_home(home, {MODEL: tiny_llama_folder}) as (w, instance):
        job = build_definitions(home, executor="in_process").resolve_job_def(COMPARISON_JOB)
        result = job.execute_in_process(
            run_config=comparison_run_config(TINY), instance=instance, partition_key=MODEL
        )
        assert result.success
        yield home, w, result


def test_every_method_and_budget_is_evaluated(compared):
    _, w, _ = compared
    evals = w.query("SELECT method, budget, stage, bits_per_param FROM evaluations WHERE model = ?", [MODEL])
    before = evals[evals["stage"] == "before_finetune"]
    expected = {(m, b) for m in ILP_METHODS for b in BUDGETS} | {
        (m, b) for m in UNIFORM_METHODS for b in TINY.uniform_budgets
    }
    assert set(zip(before["method"], before["budget"])) == expected
    after = evals[evals["stage"] == "after_finetune"]
    assert set(zip(after["method"], after["budget"].fillna(-1))) == {
        (m, b) for m in ILP_METHODS for b in FINETUNED_BUDGETS
    } | {("qlora", b) for b in TINY.uniform_budgets} | {("reference", -1)}  # the uncompressed model's LoRA
    qlora = before[before["method"] == "qlora"].sort_values("budget")
    assert np.allclose(qlora["bits_per_param"], [3.5, 4.5], atol=0.1)  # NF3, NF4 (with padding)


def test_report_is_stored_and_shown_in_the_ui(compared):
    home, _, result = compared
    handle = stored_handle(home, "comparison_report", MODEL)
    folder = home / "artifacts" / "comparison_report" / MODEL / handle.key
    table = (folder / "comparison.md").read_text()
    assert "| fp32 reference |" in table and "| QLoRA NF4 |" in table and "| LoftQ NF3 |" in table
    assert table.count("| LQ-LoRA (ILP + Fisher) |") == len(BUDGETS)
    for name in ("pareto.png", "allocation.png"):
        data = (folder / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
        pixels = imread(folder / name)
        assert pixels.shape[0] > 300 and pixels.std() > 0.05  # a drawn picture, not a blank canvas
    (mat,) = [
        m
        for m in result.get_asset_materialization_events()
        if m.asset_key == dg.AssetKey("comparison_report")
    ]
    meta = mat.materialization.metadata
    assert meta["pareto"].value.startswith("![pareto](data:image/png;base64,")
    assert meta["allocation"].value.startswith("![allocation](data:image/png;base64,")
    assert "| QLoRA NF3 |" in meta["table"].value


# --- the report functions on hand-made rows: each number lands where it should ---

ROWS = pd.DataFrame(
    [
        ("reference", None, "reference", 20.0, None, None),
        ("qlora", 4.13, "before_finetune", 30.0, 4.127, 4.86),
        ("qlora", 4.13, "after_finetune", 27.0, 4.127, 4.86),
        ("lqlora", 2.75, "before_finetune", 40.0, 2.74, 3.48),
        ("lqlora", 3.5, "before_finetune", 26.0, 3.49, 4.22),
        ("lqlora", 3.5, "after_finetune", 24.0, 3.49, 4.22),
    ],
    columns=["method", "budget", "stage", "value", "bits_per_param", "bits_incl_lowrank"],
).assign(metric="perplexity")


def test_comparison_frame_puts_each_number_on_its_row():
    frame = comparison_frame(ROWS).set_index("label")
    assert frame.loc["fp32 reference", "before_finetune"] == 20.0
    assert frame.loc["QLoRA NF4", "after_finetune"] == 27.0
    lq = frame.loc["LQ-LoRA (ILP)"].set_index("budget")
    assert lq.loc[3.5, "before_finetune"] == 26.0 and np.isnan(lq.loc[2.75, "after_finetune"])


def test_the_rate_kept_is_shown_only_when_rates_differ():
    tuned = ROWS["stage"] == "after_finetune"
    chosen = ROWS.assign(lr=np.where(tuned, np.where(ROWS["method"] == "qlora", 3e-4, 1e-3), np.nan))
    table = markdown_table(comparison_frame(chosen))
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header[-1] == "lr kept"
    rows = {line.split("|")[1].strip(): line.split("|")[-2].strip() for line in table.splitlines()[2:]}
    assert rows["QLoRA NF4"] == "0.0003" and rows["LQ-LoRA (ILP)"] in {"", "0.001"}
    assert "lr kept" not in markdown_table(comparison_frame(ROWS.assign(lr=np.where(tuned, 1e-3, np.nan))))


def test_pareto_axes_carry_the_data():
    fig = pareto_figure(comparison_frame(ROWS))
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    before = lines["LQ-LoRA (ILP), before"]
    assert list(before.get_xdata()) == [3.48, 4.22] and list(before.get_ydata()) == [40.0, 26.0]
    assert list(lines["QLoRA, after"].get_ydata()) == [27.0]
    assert list(lines["fp32 reference"].get_ydata()) == [20.0, 20.0]
    assert "bits per parameter" in ax.get_xlabel() and "perplexity" in ax.get_ylabel()
    low, high = ax.get_ylim()
    assert low < 20.0 and high > 40.0


def test_heatmap_cells_are_the_plan_bits():
    rows = pd.DataFrame(
        {
            "layer": [0, 0, 0, 1, 1, 1],
            "matrix": [
                f"bert.encoder.layer.{i}.{m}"
                for i in (0, 1)
                for m in ("attention.self.query", "attention.output.dense", "output.dense")
            ],
            "position": [0, 1, 2, 3, 4, 5],
            "bits_per_param": [2.5, 4.1, 3.2, 3.0, 3.6, 2.2],
        }
    )
    grid = allocation_grid(rows)
    # the model's order, and BERT's three "dense" matrices kept apart
    assert list(grid.columns) == ["attention.self.query", "attention.output.dense", "output.dense"]
    fig = heatmap_figure(grid)
    image = fig.axes[0].get_images()[0]
    assert np.array_equal(image.get_array(), [[2.5, 4.1, 3.2], [3.0, 3.6, 2.2]])


def test_empty_inputs_say_what_to_do():
    with pytest.raises(LQLoRAInputError, match="materialize `evaluation` first"):
        comparison_frame(ROWS.iloc[0:0])
    with pytest.raises(LQLoRAInputError, match="no assignments"):
        allocation_grid(pd.DataFrame(columns=["layer", "matrix", "position", "bits_per_param"]))


def test_rank_variants_keep_plans_of_one_method_apart():
    """A run with a rank-allocated plan and fixed-rank plans of the same method at the
    same budget: one row and one line each, labelled by how the plan chose ranks, and
    the whole model's size in the table."""
    rows = pd.DataFrame(
        [
            ("lqlora-fisher", 4.0, "before_finetune", 30.0, 3.1, 4.0, "0,8,16", 9.0e7),
            ("lqlora-fisher", 4.0, "before_finetune", 33.0, 3.2, 3.9, "8", 8.9e7),
            ("lqlora-fisher", 4.0, "before_finetune", 35.0, 2.4, 3.9, "16", 8.9e7),
            ("lqlora-fisher", 4.0, "after_finetune", 25.0, 3.1, 4.0, "0,8,16", 9.0e7),
        ],
        columns=["method", "budget", "stage", "value", "bits_per_param", "bits_incl_lowrank", "plan_ranks",
                 "total_bytes"],
    ).assign(metric="perplexity")
    frame = comparison_frame(rows).set_index("label")
    allocated = "LQ-LoRA (ILP + Fisher), ranks 0,8,16 allocated"
    assert frame.loc[allocated, "before_finetune"] == 30.0 and frame.loc[allocated, "after_finetune"] == 25.0
    assert frame.loc["LQ-LoRA (ILP + Fisher), rank 16", "before_finetune"] == 35.0
    table = markdown_table(comparison_frame(rows))
    assert "MB in all" in table and "| 90.00 |" in table
    lines = {line.get_label() for line in pareto_figure(comparison_frame(rows)).axes[0].get_lines()}
    assert f"{allocated}, before" in lines and "LQ-LoRA (ILP + Fisher), rank 8, before" in lines
    # one rank for all, as a run without --ranks makes: no label change
    single = rows[rows["plan_ranks"] == "16"].assign(plan_ranks="16")
    assert list(comparison_frame(single)["label"]) == ["LQ-LoRA (ILP + Fisher)"]
    # beside a plan stored before plans recorded their ranks (NULL): still one kind
    older = pd.concat([single, single.assign(budget=3.5, plan_ranks=None)])
    assert set(comparison_frame(older)["label"]) == {"LQ-LoRA (ILP + Fisher)"}


def test_the_rank_view_on_the_tiny_model(tmp_path_factory, tiny_llama_folder):
    """`lqlora compare --view ranks` in small: rank-allocated LQ-LoRA-Fisher beside
    each fixed rank and the baselines, budgets counting the factors; the report keeps
    them apart and draws the ranks the allocated plan chose."""
    view = dataclasses.replace(
        RANK_COMPARISON.with_stages(
            error_table={"rank": 2, "ranks": (0, 2, 4), "grid": "reduced"},
            calibration_batches={"n_sequences": 4, "seq_len": 64},
            finetuned_adapters={"steps": 2, "batch_size": 2, "seq_len": 64},
            evaluation={"n_windows": 2, "seq_len": 64},
        ),
        budgets=(6.0,),
        finetuned_budgets=(6.0,),
        uniform_budgets=(5.0,),  # NF3 (3.5 bits here) + LoRA-2 (1 bit on 64-wide matrices)
    )
    home = tmp_path_factory.mktemp("rank-view-home")
    with registered_home(home, {MODEL: tiny_llama_folder}) as (w, instance):
        job = build_definitions(home, executor="in_process").resolve_job_def(COMPARISON_JOB)
        result = job.execute_in_process(run_config=comparison_run_config(view), instance=instance, partition_key=MODEL)
        assert result.success
        plans = w.query("SELECT method, ranks, budget_kind, bits_with_lowrank, objective FROM plans")
        assert set(plans["budget_kind"]) == {"lowrank"} and (plans["bits_with_lowrank"] <= 6.0 + 1e-9).all()
        lq = plans[plans["method"] == "lqlora-fisher"].set_index("ranks")["objective"]
        assert sorted(lq.index) == ["0,2,4", "2", "4"] and lq["0,2,4"] <= lq.drop("0,2,4").min()
        handle = stored_handle(home, "comparison_report", MODEL)
        folder = home / "artifacts" / "comparison_report" / MODEL / handle.key
        table = (folder / "comparison.md").read_text()
        assert "ranks 0,2,4 allocated" in table and "rank 4 |" in table and "MB in all" in table
        assert (folder / "allocation_rank.png").read_bytes().startswith(PNG_MAGIC)  # the allocated plan's ranks
