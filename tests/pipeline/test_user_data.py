"""The graph on a user's own data: an instruction set on the tiny Llama (loss on the
responses, validation during training, the reference LoRA as the upper line) and a
three-label classification set on the tiny BERT (a head sized to the labels)."""

import json

import dagster as dg
import pandas as pd
import pytest

from assets.runs import stored_handle
from lqlora_dagster.definitions import build_definitions, resources_at
from lqlora_dagster.pipeline.dataset_registry import add_dataset
from lqlora_dagster.pipeline.finetuning import REFERENCE
from tests.conftest import registered_home
from tests.pipeline.conftest import MAIN_GRAPH, tiny_settings


def materialize(home, model: str, run_config: dict, instance) -> bool:
    defs = build_definitions(home)
    return dg.materialize(
        list(defs.assets) + list(defs.asset_checks or []), instance=instance, partition_key=model,
        resources=resources_at(home), run_config=run_config, selection=MAIN_GRAPH, raise_on_error=True,
    ).success


QA = [{"instruction": f"Name the colour number {i}.", "input": "", "output": ["red", "green", "blue"][i % 3]}
      for i in range(60)]


@pytest.fixture(scope="module")
def instruct_run(tmp_path_factory, tiny_llama_folder):
    home = tmp_path_factory.mktemp("instruct-home")
    data = home / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in QA))
    with registered_home(home, {"tiny-llama": tiny_llama_folder}) as (w, instance):
        add_dataset(w, "qa", str(data))
        settings = tiny_settings(steps=4).override(
            task_data={"train": "qa"}, finetuned_adapters={"eval_every": 2, "seq_len": 48},
            calibration_batches={"seq_len": 48}, evaluation={"seq_len": 48},
        )
        assert materialize(home, "tiny-llama", settings.run_config(), instance)
        yield home, w


def test_instruction_data_is_scored_on_its_held_out_responses(instruct_run):
    home, w = instruct_run
    evals = w.query("SELECT method, budget, stage, metric, value, dataset, n_tokens FROM evaluations ORDER BY stage")
    assert set(evals["metric"]) == {"response_perplexity"} and (evals["value"] > 1).all()
    assert set(zip(evals["method"], evals["stage"])) == {
        ("reference", "reference"), ("lqlora-fisher", "before_finetune"), ("lqlora-fisher", "after_finetune"),
        (REFERENCE, "after_finetune"),
    }
    assert set(evals["dataset"]) == {"qa (eval)"}
    calib = w.query("SELECT text FROM calibration")
    assert list(calib["text"]) == ["qa (calibration part)"]
    data = stored_handle(home, "task_data", "tiny-llama")
    assert data.task == "instruct" and data.train.rows == 60


def test_training_validates_and_the_reference_trains_the_same_recipe(instruct_run):
    home, w = instruct_run
    adapters = stored_handle(home, "finetuned_adapters", "tiny-llama").items
    assert [a.method for a in adapters] == ["lqlora-fisher", REFERENCE]
    assert all(a.best_step in (2, 4) and a.best_val_loss > 0 for a in adapters)
    steps = w.query("SELECT run, step, val_loss FROM train_steps ORDER BY run, step")
    assert steps.groupby("run").size().tolist() == [4, 4]
    assert steps.dropna()["step"].tolist() == [2, 4, 2, 4]  # validation every 2 steps


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory, tiny_bert_folder):
    home = tmp_path_factory.mktemp("classify-home")
    words = {"sun": "warm", "snow": "cold", "fog": "grey"}
    rows = [{"text": f"the {w} today, day {i}", "label": lab} for i in range(40) for w, lab in words.items()]
    pd.DataFrame(rows).to_csv(home / "weather.csv", index=False)
    with registered_home(home, {"tiny-bert": tiny_bert_folder}) as (w, instance):
        add_dataset(w, "weather", str(home / "weather.csv"))
        settings = tiny_settings(steps=3).override(
            task_data={"train": "weather"}, calibration_batches={"seq_len": 16}, evaluation={"seq_len": 16},
            finetuned_adapters={"seq_len": 16, "batch_size": 8},
        )
        assert materialize(home, "tiny-bert", settings.run_config(), instance)
        yield home, w


def test_classification_reports_accuracy_and_macro_f1_over_three_labels(classify_run):
    home, w = classify_run
    evals = w.query("SELECT method, stage, metric, value, macro_f1 FROM evaluations")
    assert set(evals["metric"]) == {"accuracy"} and evals["value"].between(0, 1).all()
    assert evals["macro_f1"].between(0, 1).all()
    assert ("reference", "after_finetune") in set(zip(evals["method"], evals["stage"]))
    data = stored_handle(home, "task_data", "tiny-bert")
    assert data.labels == ("cold", "grey", "warm")
    from lqlora_dagster.pipeline.context import StageContext
    from lqlora_dagster.pipeline.finetuning import load_finetuned

    ref = stored_handle(home, "finetuned_adapters", "tiny-bert").items[0]
    tuned = load_finetuned(StageContext.at(home), stored_handle(home, "base_model", "tiny-bert"), ref, data.labels)
    assert tuned.classifier.out_features == 3 and tuned.config.id2label[2] == "warm"
