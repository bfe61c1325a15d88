"""Training checkpoints as safetensors + JSON: trainable tensors, AdamW moments, step.

Written atomically (temp file, then rename) so a crash mid-save leaves the previous
checkpoint intact. Never pickled.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lqlora_dagster.errors import LQLoRAInputError

TENSORS = "train_state.safetensors"
BEST = "best.safetensors"  # the trainable values at the best validation loss so far
META = "train_state.json"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_state(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, meta: dict
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    tensors: dict[str, torch.Tensor] = {}
    for p_id, name in names.items():
        param = next(p for p in model.parameters() if id(p) == p_id)
        tensors[f"param.{name}"] = param.detach().cpu().contiguous()
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"adam.{name}.{key}"] = value.detach().cpu().contiguous()
    _atomic_write(folder / TENSORS, lambda p: save_file(tensors, str(p)))
    _atomic_write(folder / META, lambda p: p.write_text(json.dumps({**meta, "step": step}, indent=1)))


def load_state(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """Restore parameters and optimizer moments; returns the saved meta, or None if
    there is no checkpoint in `folder`."""
    if not (folder / META).is_file() or not (folder / TENSORS).is_file():
        return None
    meta = json.loads((folder / META).read_text())
    tensors = load_file(str(folder / TENSORS))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n in params if f"param.{n}" not in tensors]
    if missing:
        raise LQLoRAInputError(
            f"checkpoint in {folder} does not match this model: no saved value for {missing[0]!r}"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[f"param.{name}"])
            state = {
                key.rsplit(".", 1)[1]: value.to(param.device)
                for key, value in tensors.items()
                if key.startswith(f"adam.{name}.") and key.count(".") == name.count(".") + 2
            }
            if state:
                optimizer.state[param] = state
    return meta


def checkpoint_step(folder: Path) -> int | None:
    """The step a complete checkpoint in `folder` holds, or None."""
    if not (folder / META).is_file() or not (folder / TENSORS).is_file():
        return None
    try:
        return int(json.loads((folder / META).read_text())["step"])
    except (ValueError, KeyError, TypeError):
        return None


def save_best(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / BEST, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p)))


def load_best(folder: Path) -> dict[str, torch.Tensor] | None:
    return load_file(str(folder / BEST)) if (folder / BEST).is_file() else None
