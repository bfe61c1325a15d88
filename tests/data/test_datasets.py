"""User datasets: every format and task is detected, checked and encoded; every bad
input is refused with a message and leaves DuckDB `datasets` untouched."""

import json

import pandas as pd
import pytest
import torch

from lqlora_dagster.data.datasets import Columns, inspect_dataset
from lqlora_dagster.data.encode import IGNORE, classification_examples, instruction_examples, lm_windows
from lqlora_dagster.data.selection import TaskData, part_rows, row_split, stream_split
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.models.loading import load_tokenizer
from lqlora_dagster.pipeline.dataset_registry import add_dataset, registered_datasets, select_data
from lqlora_dagster.pipeline.handles import ModelHandle
from lqlora_dagster.pipeline.settings import DataSettings
from lqlora_dagster.store.warehouse import Warehouse

QA = [{"prompt": f"What is {i} plus {i}?", "response": f"{2 * i}."} for i in range(30)]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture()
def warehouse(tmp_path) -> Warehouse:
    w = Warehouse(tmp_path / "lqlora.duckdb")
    w.init_schema()
    return w


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_folder):
    return load_tokenizer(tiny_llama_folder)


def test_each_format_and_task_is_detected(tmp_path):
    (tmp_path / "a.txt").write_text("Some text to model.\n" * 5)
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"{i}.txt").write_text(f"document {i}")
    write_jsonl(tmp_path / "lm.jsonl", [{"text": "one"}, {"text": "two"}])
    pd.DataFrame({"text": ["good", "bad", "fine"], "label": ["pos", "neg", "pos"]}).to_csv(tmp_path / "c.csv", index=False)
    pd.DataFrame({"sentence": ["a", "b", "c"], "label": [2, 0, 1]}).to_parquet(tmp_path / "c.parquet")
    (tmp_path / "qa.json").write_text(json.dumps(QA))
    write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add", "input": "1 and 2", "output": "3"}])
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])

    seen = {p: inspect_dataset("x", tmp_path / p) for p in
            ["a.txt", "docs", "lm.jsonl", "c.csv", "c.parquet", "qa.json", "alpaca.jsonl", "chat.jsonl"]}
    assert {p: (s.format, s.task, s.rows) for p, s in seen.items()} == {
        "a.txt": ("txt", "lm", 1), "docs": ("txt-folder", "lm", 3), "lm.jsonl": ("jsonl", "lm", 2),
        "c.csv": ("csv", "classify", 3), "c.parquet": ("parquet", "classify", 3), "qa.json": ("json", "instruct", 30),
        "alpaca.jsonl": ("jsonl", "instruct", 1), "chat.jsonl": ("jsonl", "instruct", 1),
    }
    assert seen["c.csv"].labels == ("neg", "pos") and seen["c.parquet"].labels == ("0", "1", "2")
    assert seen["alpaca.jsonl"].use == Columns(prompt="instruction", input="input", response="output")
    assert seen["chat.jsonl"].use == Columns(messages="messages")
    assert seen["c.parquet"].use == Columns(text="sentence", label="label")


def test_question_answer_lists_use_the_first_answer(tmp_path, tokenizer):
    write_jsonl(tmp_path / "nq.jsonl", [{"question": "who wrote it", "answer": ["Ann", "Anne"]}] * 3)
    spec = inspect_dataset("nq", tmp_path / "nq.jsonl")
    assert spec.task == "instruct" and spec.use == Columns(prompt="question", response="answer")
    enc = instruction_examples(tokenizer, pd.read_json(tmp_path / "nq.jsonl", lines=True), spec.use, 48)
    answer = tokenizer.decode(enc.tensors["input_ids"][0][enc.tensors["labels"][0] != IGNORE])
    assert "Ann" in answer and "Anne" not in answer


def test_named_columns_and_forced_task(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "reply": "r", "body": "b"}])
    spec = inspect_dataset("q", tmp_path / "q.jsonl", "instruct", Columns(response="reply"))
    assert spec.use == Columns(prompt="question", response="reply")
    assert inspect_dataset("b", tmp_path / "q.jsonl", None, Columns(text="body")).task == "lm"


BAD = {
    "missing column, names the found ones": (
        "t.jsonl", '{"txt": "a", "lbl": 1}\n', {"task": "classify"},
        r"needs column\(s\) 'text', 'label'; the file has 'txt', 'lbl'; did you mean 'lbl', 'txt'\?"),
    "misspelled named column": ("t.jsonl", '{"text": "a"}\n', {"named": Columns(text="body")},
                                r"column 'body' is not in the file; it has 'text'"),
    "empty file": ("e.jsonl", "", {}, r"e.jsonl is empty"),
    "empty text": ("e.txt", "  \n", {}, r"holds no data"),
    "one class": ("o.csv", "text,label\na,pos\nb,pos\n", {}, r"has one class only \('pos'\)"),
    "mixed label types": ("m.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "neg"}\n', {},
                          r"mixes number and text labels \(e.g. '1' and 'neg'\)"),
    "missing label": ("n.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n{"text": "c", "label": 0}\n',
                      {}, r"1 row\(s\) have no 'label'"),
    "not UTF-8": ("l.txt", b"caf\xe9 au lait", {}, r"is not UTF-8 text \(byte 0xe9 at offset 3\)"),
    "not UTF-8 csv": ("l.csv", b"text,label\ncaf\xe9,1\nthe,0\n", {}, r"is not UTF-8 text \(byte 0xe9"),
    "unknown format": ("d.xlsx", "x", {}, r"unknown data format '.xlsx'"),
    "chat without a response": ("c.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', {},
                                r"does not end with an assistant turn"),
    "text that is not text": ("n.jsonl", '{"text": 5}\n', {}, r"column 'text' must hold text; row 0 holds '5'"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_data_is_refused_and_nothing_is_stored(case, tmp_path, warehouse):
    name, content, kwargs, message = BAD[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(LQLoRAInputError, match=message):
        add_dataset(warehouse, "bad", str(path), kwargs.get("task"), kwargs.get("named", Columns()))
    assert registered_datasets(warehouse).empty


def test_missing_path_and_duplicate_name(tmp_path, warehouse):
    with pytest.raises(LQLoRAInputError, match="does not exist"):
        add_dataset(warehouse, "gone", str(tmp_path / "absent.jsonl"))
    write_jsonl(tmp_path / "qa.jsonl", QA)
    add_dataset(warehouse, "qa", str(tmp_path / "qa.jsonl"))
    with pytest.raises(LQLoRAInputError, match="already registered; pass --replace"):
        add_dataset(warehouse, "qa", str(tmp_path / "qa.jsonl"))
    assert list(registered_datasets(warehouse)["name"]) == ["qa"]


def model_handle(task: str) -> ModelHandle:
    return ModelHandle("m", "/nowhere", task, None, "k", 1, 1)


def test_data_must_fit_the_model(tmp_path, warehouse):
    pd.DataFrame({"text": ["a", "b"], "label": [0, 1]}).to_csv(tmp_path / "c.csv", index=False)
    add_dataset(warehouse, "cls", str(tmp_path / "c.csv"))
    write_jsonl(tmp_path / "qa.jsonl", QA)
    add_dataset(warehouse, "qa", str(tmp_path / "qa.jsonl"))
    with pytest.raises(LQLoRAInputError, match="'cls' is classify data, but model 'm' is a causal LM without a classification head"):
        select_data(warehouse, model_handle("causal-lm"), DataSettings(train="cls"))
    with pytest.raises(LQLoRAInputError, match="'qa' is instruct data, but model 'm' is a classifier"):
        select_data(warehouse, model_handle("seq-cls"), DataSettings(train="qa"))
    with pytest.raises(LQLoRAInputError, match="eval dataset 'cls' is classify data, the training dataset 'qa' is instruct"):
        select_data(warehouse, model_handle("causal-lm"), DataSettings(train="qa", eval="cls"))
    with pytest.raises(LQLoRAInputError, match="unknown dataset 'nope'"):
        select_data(warehouse, model_handle("causal-lm"), DataSettings(train="nope"))


def test_an_edited_file_gets_a_new_content_id(tmp_path, warehouse):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    add_dataset(warehouse, "qa", str(path))
    before = select_data(warehouse, model_handle("causal-lm"), DataSettings(train="qa"), log=lambda m: None)
    write_jsonl(path, QA + QA[:5])
    notes = []
    after = select_data(warehouse, model_handle("causal-lm"), DataSettings(train="qa"), log=notes.append)
    assert after.train.rows == 35 and "changed since it was registered (30 -> 35 rows)" in notes[0]
    assert all(before.content_id(p) != after.content_id(p) for p in ("train", "val", "eval", "calibration"))
    assert registered_datasets(warehouse)["rows"].tolist() == [35]


def test_splits_are_disjoint_and_seeded():
    spec = inspect_dataset.__globals__["DatasetSpec"]("d", "/x", "jsonl", "instruct", 100, (), "s")
    data = TaskData("instruct", spec, spec)
    parts = {p: set(row_split(100, data, p)) for p in ("train", "val", "eval")}
    assert [len(parts[p]) for p in ("train", "val", "eval")] == [80, 10, 10]
    assert parts["train"] | parts["val"] | parts["eval"] == set(range(100))
    assert not (parts["train"] & parts["val"] or parts["train"] & parts["eval"] or parts["val"] & parts["eval"])
    assert set(row_split(100, TaskData("instruct", spec, spec, split_seed=1), "eval")) != parts["eval"]
    cuts = [stream_split(1000, data, p) for p in ("train", "val", "eval")]
    assert [(c.start, c.stop) for c in cuts] == [(0, 800), (800, 900), (900, 1000)]
    with pytest.raises(LQLoRAInputError, match="too few to hold out"):
        row_split(2, data, "train")


def test_split_rows_come_from_the_file(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    spec = inspect_dataset("qa", path)
    data = TaskData("instruct", spec, spec)
    prompts = [set(part_rows(data, p)["prompt"]) for p in ("train", "val", "eval")]
    assert sum(map(len, prompts)) == 30 and not prompts[0] & prompts[2]


def test_instruction_labels_cover_only_the_response(tokenizer, tmp_path):
    rows = pd.DataFrame(QA[:4])
    enc = instruction_examples(tokenizer, rows, Columns(prompt="prompt", response="response"), 64)
    ids, mask, labels = enc.tensors["input_ids"], enc.tensors["attention_mask"], enc.tensors["labels"]
    for i in range(4):
        trained = labels[i] != IGNORE
        assert trained.any() and torch.equal(labels[i][trained], ids[i][trained])
        answer = tokenizer.decode(ids[i][trained])
        assert QA[i]["response"] in answer and QA[i]["prompt"] not in answer
        assert int(mask[i].sum()) > int(trained.sum())  # the prompt is input, not target
    assert enc.truncated == 0
    short = instruction_examples(tokenizer, rows, Columns(prompt="prompt", response="response"), 12)
    assert short.truncated == 4 and (short.tensors["labels"] != IGNORE).any()


def test_chat_rows_use_the_chat_template(tokenizer):
    rows = pd.DataFrame({"messages": [[{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello!"}]]})
    enc = instruction_examples(tokenizer, rows, Columns(messages="messages"), 64)
    text = tokenizer.decode(enc.tensors["input_ids"][0][enc.tensors["attention_mask"][0].bool()])
    assert "<|im_start|>user" in text and "<|im_start|>assistant" in text  # SmolLM2's template
    assert "hello!" in tokenizer.decode(enc.tensors["input_ids"][0][enc.tensors["labels"][0] != IGNORE])


def test_classification_examples_map_labels_and_count_truncation(tokenizer):
    rows = pd.DataFrame({"text": ["short", "a much longer sentence than eight tokens can hold, surely"], "label": ["b", "a"]})
    enc = classification_examples(tokenizer, rows, Columns(text="text", label="label"), ("a", "b"), 8)
    assert enc.tensors["labels"].tolist() == [1, 0] and enc.truncated == 1
    with pytest.raises(LQLoRAInputError, match=r"label\(s\) 'c' are not among the training labels"):
        classification_examples(tokenizer, rows.assign(label=["c", "a"]), Columns(text="text", label="label"), ("a", "b"), 8)


def test_windows_start_with_bos_when_the_model_expects_it():
    ids = torch.arange(10, 40)
    plain, led = lm_windows(ids, 8, None), lm_windows(ids, 8, 1)
    assert plain.shape == (3, 8) and torch.equal(plain[0], ids[:8])
    assert led.shape == (4, 8) and (led[:, 0] == 1).all() and torch.equal(led[0, 1:], ids[:7])
