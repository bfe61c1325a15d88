"""Load a resolved HF folder as a float32 model and tokenizer, offline."""

from pathlib import Path

import torch

from lqlora_dagster.errors import LQLoRAInputError

HEAD_SEED = 0


def load_model(folder: Path, task: str = "causal-lm", num_labels: int = 2):
    """A float32 model in eval mode. Transformers is imported here, not at module
    import, so the Dagster code server loads fast."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        elif task == "seq-cls":
            # the new classification head is drawn from a fixed seed, so every stage
            # (Fisher, decomposition, reference) starts from the same head
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(HEAD_SEED)
                model = AutoModelForSequenceClassification.from_pretrained(
                    folder, dtype=torch.float32, num_labels=num_labels
                )
        else:
            raise LQLoRAInputError(f"unknown task {task!r}; use 'causal-lm' or 'seq-cls'")
    except (OSError, ValueError, KeyError) as err:
        if isinstance(err, LQLoRAInputError):
            raise
        raise LQLoRAInputError(f"cannot load a {task} model from {folder}: {err}") from err
    return model.eval()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise LQLoRAInputError(f"cannot load a tokenizer from {folder}: {err}") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
