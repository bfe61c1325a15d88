"""The classifier side of the comparison on a tiny BERT with MiniLM's tokenizer and the
real sentence-polarity data: Fisher from labelled sentences, finetuning of the factors
and the head, accuracy on the held-out test sentences, and the report."""


import pytest
import torch

from assets.runs import stored_handle
from lqlora_dagster.comparison import ENCODER_COMPARISON
from lqlora_dagster.data.polarity import polarity_split
from lqlora_dagster.definitions import COMPARISON_JOB, build_definitions, comparison_run_config
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.finetuning import load_finetuned
from lqlora_dagster.pipeline.settings import FinetuneSettings
from lqlora_dagster.surgery.lq_model_io import load_lq_model
from tests.conftest import registered_home

MODEL = "tiny-bert"
TINY = ENCODER_COMPARISON.with_stages(
    error_table={"rank": 4, "grid": "reduced"},
    calibration_batches={"n_sequences": 8, "seq_len": 32},
    # 64 validation sentences, not the comparison's 1000: scoring those every 3 steps
    # of 14 runs was a quarter of this module's time
    finetuned_adapters={"steps": 6, "batch_size": 8, "seq_len": 32, "eval_every": 3,
                        "lr_grid": (1e-3, 3e-3), "val_examples": 64},
    evaluation={"seq_len": 32},
)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_bert_folder):
    home = tmp_path_factory.mktemp("encoder-home")
    with registered_home(home, {MODEL: tiny_bert_folder}) as (w, instance):
        job = build_definitions(home, executor="in_process").resolve_job_def(COMPARISON_JOB)
        result = job.execute_in_process(
            run_config=comparison_run_config(TINY), instance=instance, partition_key=MODEL
        )
        assert result.success
        yield home, w


def test_split_is_fixed_and_disjoint():
    train, test = polarity_split("train"), polarity_split("test")
    assert (len(train), len(test)) == (3200, 800)
    assert not {t for t, _ in train} & {t for t, _ in test}
    assert polarity_split("test") == test  # the same sentences every time
    assert 350 < sum(label for _, label in test) < 450  # both classes, roughly balanced


def test_accuracy_rows_for_every_method_budget_and_stage(compared):
    _, w = compared
    evals = w.query("SELECT method, budget, stage, metric, value, perplexity FROM evaluations")
    assert set(evals["metric"]) == {"accuracy"} and evals["perplexity"].isna().all()
    assert evals["value"].between(0, 1).all()
    expected = {
        (m, b, st)
        for m in TINY.ilp_methods
        for b in TINY.budgets
        for st in ("before_finetune", "after_finetune")
    }
    rows = set(zip(evals["method"], evals["budget"].fillna(-1), evals["stage"]))
    assert rows == expected | {("reference", -1, "after_finetune")}  # the uncompressed model's LoRA
    calib = w.query("SELECT text, n_sequences FROM calibration")
    assert list(calib["text"]) == ["polarity (calibration part)"] and list(calib["n_sequences"]) == [8]
    fisher = w.query("SELECT max FROM fisher_stats")
    assert (fisher["max"] > 0).all()  # gradients of the label loss reached every target


def test_finetuning_trained_the_head_with_the_factors(compared):
    home, w = compared
    ctx = StageContext.at(home)
    model = stored_handle(home, "base_model", MODEL)
    ref = stored_handle(home, "finetuned_adapters", MODEL).items[0]
    decomposed = load_lq_model(ctx.store.get("decomposed_model", MODEL, ref.decomp_key).path)
    tuned = load_finetuned(ctx, model, ref)
    assert not torch.equal(decomposed.classifier.weight, tuned.classifier.weight)
    steps = w.query("SELECT count(*) AS n FROM train_steps WHERE run = ?", [ref.run_key])["n"].iloc[0]
    assert steps == TINY.stages.finetuned_adapters.steps


def test_report_shows_accuracy(compared):
    home, _ = compared
    handle = stored_handle(home, "comparison_report", MODEL)
    folder = home / "artifacts" / "comparison_report" / MODEL / handle.key
    table = (folder / "comparison.md").read_text()
    assert "accuracy before finetune" in table
    # a fresh head is a coin toss before finetuning; after it, the uncompressed model's LoRA is the upper line
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    ref = next(line for line in table.splitlines() if line.startswith("| fp32 reference |"))
    cells = dict(zip(header, [c.strip() for c in ref.strip("|").split("|")]))
    before, after = cells["accuracy before finetune"], cells["after finetune"]
    assert before == "" and 0 <= float(after) <= 1
    assert table.count("| LQ-LoRA (ILP + Fisher) |") == len(TINY.budgets)
    assert (folder / "pareto.png").stat().st_size > 10_000


def test_each_adapter_kept_the_rate_with_the_lowest_validation_loss(compared):
    home, w = compared
    grid = TINY.stages.finetuned_adapters.lr_grid
    assert len(grid) == 2
    adapters = stored_handle(home, "finetuned_adapters", MODEL).items
    runs = w.query("SELECT plan_id, run, min(val_loss) AS best FROM train_steps GROUP BY plan_id, run")
    evals = w.query("SELECT plan_id, lr FROM evaluations WHERE stage = 'after_finetune'")
    assert len(adapters) == len(TINY.finetuned_methods) * len(TINY.finetuned_budgets) + 1  # + the reference
    for ref in adapters:
        tried = runs[runs["plan_id"] == ref.plan_id]
        assert len(tried) == len(grid)  # one run per rate, each kept in train_steps
        assert ref.best_val_loss == tried["best"].min() and ref.run_key in set(tried["run"])
        assert ref.lr in grid and list(evals.loc[evals["plan_id"] == ref.plan_id, "lr"]) == [ref.lr]


def test_lr_grid_settings():
    with pytest.raises(LQLoRAInputError, match="twice"):
        FinetuneSettings(lr_grid=(1e-3, 1e-3))
    with pytest.raises(LQLoRAInputError, match="eval_every"):
        FinetuneSettings(lr_grid=(1e-3, 3e-3), eval_every=0)
    with pytest.raises(LQLoRAInputError, match="lr_grid"):
        FinetuneSettings(lr_grid=(0.0,))
    # a rate of the grid is the same run as that rate alone (cached once), whatever else the grid holds
    assert FinetuneSettings(lr_grid=(1e-4, 1e-3)).recipe(1e-3) == FinetuneSettings(lr=1e-3).recipe(1e-3)
    assert FinetuneSettings(lr_grid=(1e-4, 1e-3)).recipe(1e-4) != FinetuneSettings().recipe(1e-3)
