"""The kinds of model a registration holds, and how each is built and loaded.

A kind (`causal-lm`, `seq-cls`) names transformers' Auto class and PEFT's task type; it
is all that building, loading, saving and exporting a model need. What a model is
trained and scored on is a task (`tasks.py`), which sits above and uses its kind.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from lqlora_dagster.errors import LQLoRAInputError

HEAD_SEED = 0  # a fresh classification head is drawn from this seed wherever it is built


@dataclass(frozen=True)
class ModelKind:
    name: str
    auto_class: str  # transformers Auto* class that builds the model
    peft_type: str  # PEFT's task_type of an exported adapter
    fresh_head: bool = False  # a classifier: its head is new, seeded, for 2 labels until data sizes it

    def _auto(self):
        # transformers loads on first use (0.6 s): commands that read no model skip it
        import transformers

        return getattr(transformers, self.auto_class)

    def load(self, folder: Path) -> torch.nn.Module:
        if not self.fresh_head:
            return self._auto().from_pretrained(folder, dtype=torch.float32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(HEAD_SEED)
            return self._auto().from_pretrained(folder, dtype=torch.float32, num_labels=2)

    def from_config(self, config) -> torch.nn.Module:
        return self._auto().from_config(config, dtype=torch.float32)


MODEL_KINDS: dict[str, ModelKind] = {
    k.name: k
    for k in (
        ModelKind("causal-lm", "AutoModelForCausalLM", "CAUSAL_LM"),
        ModelKind("seq-cls", "AutoModelForSequenceClassification", "SEQ_CLS", fresh_head=True),
    )
}


def model_kind(name: str) -> ModelKind:
    if name not in MODEL_KINDS:
        raise LQLoRAInputError(f"unknown model kind {name!r}; use one of {', '.join(MODEL_KINDS)}")
    return MODEL_KINDS[name]
