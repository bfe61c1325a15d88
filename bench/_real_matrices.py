"""Real SmolLM2 weight matrices for benchmarks (one per distinct shape, or whole layers)."""

import os
from pathlib import Path

import torch
from safetensors import safe_open

from lqlora_dagster.models.source import resolve_model_folder

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def smollm2_weights_file() -> Path:
    home = Path(os.environ.get("LQLORA_HOME", ".lqlora"))
    folder, _ = resolve_model_folder("smollm2-135m", home / "models")
    return folder / "model.safetensors"


def layer_matrices(layers: list[int]) -> dict[str, torch.Tensor]:
    """{"model.layers.L.<...>.kind": (out, in) fp32 weight} for the given layers."""
    out = {}
    with safe_open(str(smollm2_weights_file()), "pt") as f:
        for key in f.keys():
            parts = key.split(".")
            if key.endswith("proj.weight") and int(parts[2]) in layers and parts[-2] in KINDS:
                out[key[: -len(".weight")]] = f.get_tensor(key).to(torch.float32)
    return out


def all_target_matrices() -> dict[str, torch.Tensor]:
    """Every one of the 210 target matrices, by module name."""
    with safe_open(str(smollm2_weights_file()), "pt") as f:
        n_layers = 1 + max(int(k.split(".")[2]) for k in f.keys() if k.startswith("model.layers."))
    return layer_matrices(list(range(n_layers)))
