"""Load a resolved HF folder as a float32 model of its kind, and its tokenizer, offline."""

from pathlib import Path

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.models.kinds import model_kind


def load_model(folder: Path, task: str = "causal-lm"):
    """A float32 model in eval mode (`task`: the model kind, causal-lm or seq-cls).
    Transformers is imported by the kind, not at module import, so the Dagster code
    server loads fast."""
    spec = model_kind(task)
    try:
        model = spec.load(folder)
    except (OSError, ValueError, KeyError) as err:
        if isinstance(err, LQLoRAInputError):
            raise
        raise LQLoRAInputError(f"cannot load a {task} model from {folder}: {err}") from err
    return model.eval()


def load_tokenizer(folder: Path):
    # transformers loads on first use (0.6 s): commands that read no model skip it
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise LQLoRAInputError(f"cannot load a tokenizer from {folder}: {err}") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
