"""Save an LQ model to a folder and load it back: safetensors + JSON, no pickle.

Folder layout:
    config.json            the HF model config
    lqlora.json            per-layer structure (shape, quant config, rank, scaling)
    model.safetensors      every tensor of the model: packed Q buffers, L1, L2, the rest
    tokenizer files        when a tokenizer is given
Loading builds the architecture from config.json without allocating weights, swaps in
LQLinear shells of the recorded structure, then assigns the file's tensors and checks
that nothing is missing or left empty.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.models.kinds import model_kind
from lqlora_dagster.models.layer_types import layer_type_of
from lqlora_dagster.models.skeleton import assign, empty_model
from lqlora_dagster.quant.config import QuantConfig
from lqlora_dagster.quant.matrix import QuantizedMatrix
from lqlora_dagster.surgery.injector import lq_layers, set_submodule
from lqlora_dagster.surgery.lq_linear import LQLinear

LAYOUT = "lqlora.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def save_lq_model(model: torch.nn.Module, folder: Path, tokenizer=None, task: str = "causal-lm") -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = lq_layers(model)
    if not layers:
        raise LQLoRAInputError(
            "the model has no LQLinear layers; decompose it before saving it as an LQ model"
        )
    layout = {
        "format_version": FORMAT_VERSION,
        "task": task,
        "layers": {
            name: {
                "shape": [m.out_features, m.in_features],
                "config": m.config.name,
                "rank": m.rank,
                "scaling": m.scaling,
                "transposed": m.transposed,
                "bias": m.bias is not None,
            }
            for name, m in layers.items()
        },
    }
    model.config.save_pretrained(folder)
    save_model(model, str(folder / WEIGHTS))
    (folder / LAYOUT).write_text(json.dumps(layout, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _shell(spec: dict, kind: str) -> LQLinear:
    """An LQLinear of the recorded structure whose tensors live on the meta device:
    the file's tensors are assigned into it, nothing is allocated twice."""
    rows, cols = spec["shape"]
    meta = torch.device("meta")
    quantized = QuantizedMatrix.empty((rows, cols), QuantConfig.parse(spec["config"]), meta)
    rank = spec["rank"]
    bias = torch.empty(rows, device=meta) if spec["bias"] else None
    return LQLinear(quantized, torch.empty(rows, rank, device=meta), torch.empty(rank, cols, device=meta),
                    bias, spec["scaling"], kind)


def load_lq_model(folder: Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The saved model, built without allocating its weights: parameters start on the
    meta device and the file's tensors are assigned in, so memory is the packed size
    plus the non-target parameters, never the dense model."""
    # transformers loads on first use (0.6 s): commands that read no model skip it
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / LAYOUT).is_file():
        raise LQLoRAInputError(f"{folder} is not a saved LQ model (no {LAYOUT})")
    layout = json.loads((folder / LAYOUT).read_text())
    if layout.get("format_version") != FORMAT_VERSION:
        raise LQLoRAInputError(
            f"{folder} has LQ model format {layout.get('format_version')}, expected {FORMAT_VERSION}"
        )
    model = empty_model(model_kind(layout["task"]), AutoConfig.from_pretrained(folder))
    for name, spec in layout["layers"].items():
        kind = layer_type_of(model.get_submodule(name))
        set_submodule(model, name, _shell(spec, kind.name if kind else "Linear"))
    unexpected, empty = assign(model, load_file(str(folder / WEIGHTS)))
    if unexpected or empty:
        raise LQLoRAInputError(
            f"{folder / WEIGHTS} does not match its layout: missing {empty[:3]}, unexpected {unexpected[:3]}"
        )
    for layer in lq_layers(model).values():  # the file keeps factors in fp32; so does training
        layer.L1.requires_grad_(True)
        layer.L2.requires_grad_(True)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
    return model.to(device).eval()
