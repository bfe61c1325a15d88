"""Build a model's module tree without allocating its weights, then assign it only the
tensors it needs: a saved LQ model gets its packed matrices, the decomposition stage
gets every tensor except the target weights (read one at a time when decomposed).
Either way the dense model never exists in memory."""

from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open

from lqlora_dagster.models.kinds import ModelKind
from lqlora_dagster.models.targets import Target
from lqlora_dagster.models.weights import key_to_file


def empty_model(kind: ModelKind, config) -> torch.nn.Module:
    """Parameters on the meta device; buffers real, because non-persistent ones (rotary
    inv_freq, BERT's position_ids) are in no file and only the constructor makes them."""
    with init_empty_weights(include_buffers=False):
        return kind.from_config(config)


def tied_names(model: torch.nn.Module) -> list[str]:
    """The input and output embedding weights' names when the config ties them."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or not getattr(model.config, "tie_word_embeddings", False):
        return []
    names = {id(m): n for n, m in model.named_modules()}
    return [f"{names[id(inp)]}.weight", f"{names[id(out)]}.weight"]


def assign(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Put the tensors into the model as they are (no copy); returns (names the model does
    not have, names still empty). A tied embedding stored under one name fills both."""
    tied = tied_names(model)
    stored = [k for k in tied if k in state]
    for key in tied if stored else ():
        state.setdefault(key, state[stored[0]])
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    return list(unexpected), empty


def base_without_targets(folder: Path, kind: ModelKind, targets: list[Target]) -> torch.nn.Module | None:
    """The base model with every tensor but the targets' weights read from its safetensors
    (as float32, like `ModelKind.load`), the targets' weights left on meta. None when the
    checkpoint's names do not cover the model (some older checkpoints): load it whole."""
    # transformers loads on first use (0.6 s): commands that read no model skip it
    from transformers import AutoConfig

    folder = Path(folder)
    skip = {f"{t.name}.weight" for t in targets}
    files = key_to_file(folder)
    if not skip <= set(files):
        return None
    model = empty_model(kind, AutoConfig.from_pretrained(folder))
    state: dict[str, torch.Tensor] = {}
    for path in sorted(set(files.values())):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if key not in skip:
                    tensor = f.get_tensor(key)
                    state[key] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
    unexpected, empty = assign(model, state)
    if unexpected or set(empty) - skip:
        return None
    return model.eval()
