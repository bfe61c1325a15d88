"""What a model is trained and scored for, as data: the registry of tasks.

| task      | model class                        | data (calibration / training / evaluation)       | metric     |
| causal-lm | AutoModelForCausalLM               | token windows of the speeches, split by year      | perplexity |
| seq-cls   | AutoModelForSequenceClassification | Pang & Lee polarity sentences (train / test)      | accuracy   |

A task says how to build its model, which examples each stage reads, how to batch
them for training, how to score a model, and which freshly initialised head (if any)
trains with the factors. A new task is one class here, one entry in `TASKS`, and its
tests.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from lqlora_dagster.errors import LQLoRAInputError

HEAD_SEED = 0  # the fresh classification head is drawn from this seed in every stage


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: str  # transformers Auto* class that builds the model
    peft_type: str  # PEFT's task_type of an exported adapter
    metric: str  # what `score` returns: "perplexity" (lower is better) or "accuracy"
    # whether the untrained base model is worth a reference row (a fresh head is a coin toss)
    scores_reference: bool = True

    def _auto(self):
        import transformers

        return getattr(transformers, self.auto_class)

    def load(self, folder: Path) -> torch.nn.Module:
        return self._auto().from_pretrained(folder, dtype=torch.float32)

    def from_config(self, config) -> torch.nn.Module:
        return self._auto().from_config(config, dtype=torch.float32)

    def head(self, model: torch.nn.Module) -> str | None:
        """The module that trains with the factors (None: only the factors train)."""
        return None

    def calibration_source(self, s) -> tuple[str, str]:
        """(what the calibration reads, an id of its content) for DuckDB and the key."""
        raise NotImplementedError

    def calibration_examples(self, tokenizer, s):
        raise NotImplementedError

    def training_examples(self, tokenizer, s):
        raise NotImplementedError

    def eval_examples(self, tokenizer, s):
        raise NotImplementedError

    def batches(self, examples, settings):
        raise NotImplementedError

    def score(self, model: torch.nn.Module, examples, s) -> float:
        raise NotImplementedError

    def n_tokens(self, examples) -> int:
        raise NotImplementedError


@dataclass(frozen=True)
class CausalLM(Task):
    """Next-token prediction; calibration, training and evaluation read disjoint
    year ranges of the State-of-the-Union speeches (or a user text for calibration)."""

    def calibration_source(self, s) -> tuple[str, str]:
        from lqlora_dagster.data.corpora import read_text
        from lqlora_dagster.store.keys import stable_key

        return (s.text, s.text) if s.text == "sotu" else (s.text, stable_key(read_text(Path(s.text))))

    def calibration_examples(self, tokenizer, s) -> dict[str, torch.Tensor]:
        from lqlora_dagster.data.corpora import read_text, sotu_text
        from lqlora_dagster.data.windows import token_windows, tokenize

        text = sotu_text("calibration") if s.text == "sotu" else read_text(Path(s.text))
        return {"input_ids": token_windows(tokenize(tokenizer, text), s.seq_len, s.n_sequences, seed=s.seed)}

    def training_examples(self, tokenizer, s) -> torch.Tensor:
        from lqlora_dagster.data.corpora import sotu_text
        from lqlora_dagster.data.windows import token_windows, tokenize

        return token_windows(tokenize(tokenizer, sotu_text("train")), s.seq_len)

    def eval_examples(self, tokenizer, s) -> torch.Tensor:
        from lqlora_dagster.data.corpora import sotu_text
        from lqlora_dagster.data.windows import token_windows, tokenize

        return token_windows(tokenize(tokenizer, sotu_text("eval")), s.seq_len, s.n_windows)

    def batches(self, examples, settings):
        from lqlora_dagster.training.finetune import causal_lm_batches

        return causal_lm_batches(examples, settings)

    def score(self, model, examples, s) -> float:
        from lqlora_dagster.evaluation import perplexity

        return perplexity(model, examples, s.batch_size)

    def n_tokens(self, examples) -> int:
        return int(examples.numel())


@dataclass(frozen=True)
class SequenceClassification(Task):
    """Sentence labels; calibration takes the first train sentences (never the test
    split), training one pass over the train split, evaluation the test split."""

    scores_reference: bool = False

    def load(self, folder: Path) -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(HEAD_SEED)
            return self._auto().from_pretrained(folder, dtype=torch.float32, num_labels=2)

    def head(self, model: torch.nn.Module) -> str | None:
        return "score" if hasattr(model, "score") else "classifier"

    def calibration_source(self, s) -> tuple[str, str]:
        return "polarity", "polarity"

    def calibration_examples(self, tokenizer, s) -> dict[str, torch.Tensor]:
        from lqlora_dagster.data.polarity import encode_sentences, polarity_split

        if s.text != "sotu":
            raise LQLoRAInputError("a classifier calibrates on the polarity train sentences; leave `text` unset")
        rows = polarity_split("train")
        if s.n_sequences > len(rows):
            raise LQLoRAInputError(f"{s.n_sequences} calibration sentences asked, the train split has {len(rows)}")
        return encode_sentences(tokenizer, rows[: s.n_sequences], s.seq_len)

    def training_examples(self, tokenizer, s) -> dict[str, torch.Tensor]:
        from lqlora_dagster.data.polarity import encode_sentences, polarity_split

        return encode_sentences(tokenizer, polarity_split("train"), s.seq_len)

    def eval_examples(self, tokenizer, s) -> dict[str, torch.Tensor]:
        from lqlora_dagster.data.polarity import encode_sentences, polarity_split

        return encode_sentences(tokenizer, polarity_split("test"), s.seq_len)

    def batches(self, examples, settings):
        from lqlora_dagster.training.finetune import classification_batches

        return classification_batches(examples["input_ids"], examples["attention_mask"], examples["labels"], settings)

    def score(self, model, examples, s) -> float:
        from lqlora_dagster.evaluation import accuracy

        return accuracy(model, examples["input_ids"], examples["attention_mask"], examples["labels"], 64)

    def n_tokens(self, examples) -> int:
        return int(examples["attention_mask"].sum())


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        CausalLM("causal-lm", "AutoModelForCausalLM", "CAUSAL_LM", "perplexity"),
        SequenceClassification("seq-cls", "AutoModelForSequenceClassification", "SEQ_CLS", "accuracy"),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise LQLoRAInputError(f"unknown task {name!r}; use one of {', '.join(TASKS)}")
    return TASKS[name]
