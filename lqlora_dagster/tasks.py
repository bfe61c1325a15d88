"""What a model is trained and scored for, as data: the registry of tasks.

| task      | data task | model class                        | examples                            | metric                 |
| causal-lm | lm        | AutoModelForCausalLM               | token windows of a text stream      | perplexity             |
| instruct  | instruct  | AutoModelForCausalLM               | prompt + response, loss on response | response perplexity    |
| seq-cls   | classify  | AutoModelForSequenceClassification | labelled sentences                  | accuracy (+ macro-F1)  |

A registered model has a model kind (`causal-lm` or `seq-cls`, which says how to load
it); a run's task follows from its training data and must fit that kind. A task says
how to build its model, how to turn a part of the run's data (`data/selection.py`) into
tensors, how to batch them, and how to score a model. A new task is one class here,
one entry in `TASKS`, and its tests.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lqlora_dagster.data.encode import (
    IGNORE,
    Encoded,
    bos_id,
    classification_examples,
    instruction_examples,
    lm_windows,
)
from lqlora_dagster.data.selection import part_rows, part_stream
from lqlora_dagster.data.windows import tokenize
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.metrics import classification_scores, mean_loss, perplexity
from lqlora_dagster.models.kinds import HEAD_SEED, ModelKind, model_kind
from lqlora_dagster.training.finetune import example_batches

DATA_TASKS = {"lm": "causal-lm", "instruct": "instruct", "classify": "seq-cls"}  # dataset task -> task


@dataclass(frozen=True)
class Task:
    name: str
    data_task: str  # the dataset task it reads: lm | instruct | classify
    model_kind: str  # the registered model kind it needs: causal-lm | seq-cls
    metric: str  # the headline of `score`; lower is better for perplexities
    # whether the untrained base model is worth a reference row (a fresh head is a coin toss)
    scores_reference: bool = True

    @property
    def kind(self) -> ModelKind:
        return model_kind(self.model_kind)

    def load(self, folder: Path) -> torch.nn.Module:
        return self.kind.load(folder)

    def from_config(self, config) -> torch.nn.Module:
        return self.kind.from_config(config)

    def head(self, model: torch.nn.Module) -> str | None:
        """The module that trains with the factors (None: only the factors train)."""
        return None

    def fit_head(self, model: torch.nn.Module, labels: tuple[str, ...]) -> torch.nn.Module:
        """Size a classifier's head to the data's labels (a no-op for other tasks)."""
        return model

    def examples(self, tokenizer, data, part: str, seq_len: int):
        """`Encoded` tensors of one part of the run's data (calibration/train/val/eval)."""
        raise NotImplementedError

    def batches(self, examples: dict[str, torch.Tensor], settings):
        return example_batches(examples, settings)

    def score(self, model: torch.nn.Module, examples: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:
        """{metric: value}, the task's headline metric first."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, examples: dict[str, torch.Tensor], batch_size: int) -> float:
        """Mean loss per predicted token (or per example): what validation tracks."""
        return mean_loss(model, examples, batch_size)

    def n_tokens(self, examples: dict[str, torch.Tensor]) -> int:
        return int(examples["attention_mask"].sum()) if "attention_mask" in examples else int(examples["input_ids"].numel())


@dataclass(frozen=True)
class CausalLM(Task):
    """Next-token prediction on windows of a text stream."""

    def examples(self, tokenizer, data, part: str, seq_len: int):
        ids = part_stream(data, part, lambda text: tokenize(tokenizer, text))
        return Encoded({"input_ids": lm_windows(ids, seq_len, bos_id(tokenizer))}, 0)

    def score(self, model, examples, batch_size) -> dict[str, float]:
        return {"perplexity": perplexity(model, examples["input_ids"], batch_size)}


@dataclass(frozen=True)
class Instruct(Task):
    """Instruction tuning: the prompt is context, the loss is on the response tokens."""

    def examples(self, tokenizer, data, part: str, seq_len: int):
        spec, _ = data.source(part)
        return instruction_examples(tokenizer, part_rows(data, part), spec.use, seq_len)

    def score(self, model, examples, batch_size) -> dict[str, float]:
        return {"response_perplexity": math.exp(self.loss(model, examples, batch_size))}

    def n_tokens(self, examples: dict[str, torch.Tensor]) -> int:
        """The response tokens scored (the prompt is context, not target)."""
        return int((examples["labels"] != IGNORE).sum())


@dataclass(frozen=True)
class SequenceClassification(Task):
    """Sentence labels; a fresh head (seeded) sized to the training labels trains with the factors."""

    scores_reference: bool = False

    def head(self, model: torch.nn.Module) -> str | None:
        return "score" if hasattr(model, "score") else "classifier"

    def fit_head(self, model: torch.nn.Module, labels: tuple[str, ...]) -> torch.nn.Module:
        n = len(labels)
        if not labels or model.config.num_labels == n:  # no labels known: keep the head as built
            return model
        head_name = self.head(model)
        head = model.get_submodule(head_name)
        if not isinstance(head, torch.nn.Linear):  # a head module (RoBERTa's): its last Linear gives the labels
            last = [name for name, m in head.named_modules() if isinstance(m, torch.nn.Linear)][-1]
            head_name = f"{head_name}.{last}"
        old = model.get_submodule(head_name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(HEAD_SEED)
            new = torch.nn.Linear(old.in_features, n, bias=old.bias is not None).to(old.weight.device)
        owner, _, attr = head_name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, new)
        model.config.num_labels = n
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}
        model.num_labels = n
        return model

    def examples(self, tokenizer, data, part: str, seq_len: int):
        spec, _ = data.source(part)
        return classification_examples(tokenizer, part_rows(data, part), spec.use, data.labels, seq_len)

    def score(self, model, examples, batch_size) -> dict[str, float]:
        return classification_scores(model, examples, batch_size)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        CausalLM("causal-lm", "lm", "causal-lm", "perplexity"),
        Instruct("instruct", "instruct", "causal-lm", "response_perplexity"),
        SequenceClassification("seq-cls", "classify", "seq-cls", "accuracy"),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise LQLoRAInputError(f"unknown task {name!r}; use one of {', '.join(TASKS)}")
    return TASKS[name]


def task_of_data(data_task: str) -> Task:
    """The task that reads a dataset task's examples (lm -> causal-lm, ...)."""
    if data_task not in DATA_TASKS:
        raise LQLoRAInputError(f"unknown dataset task {data_task!r}; use one of {', '.join(DATA_TASKS)}")
    return get_task(DATA_TASKS[data_task])


def task_for_data(data_task: str, model_kind: str, dataset: str, model: str) -> Task:
    """The task a dataset gives a model, or why it does not fit."""
    task = task_of_data(data_task)
    if task.model_kind != model_kind:
        if data_task == "classify":
            why = f"model {model!r} is a causal LM without a classification head; register an encoder or classifier"
        else:
            why = f"model {model!r} is a classifier (an encoder with a label head); it cannot generate text"
        raise LQLoRAInputError(f"dataset {dataset!r} is {data_task} data, but {why}")
    return task
