"""Save an LQ model to a folder and load it back: safetensors + JSON, no pickle.

Folder layout:
    config.json            the HF model config
    lqlora.json            per-layer structure (shape, quant config, rank, scaling)
    model.safetensors      every tensor of the model: packed Q buffers, L1, L2, the rest
    tokenizer files        when a tokenizer is given
Loading builds the architecture from config.json, swaps in LQLinear shells of the
recorded structure, then loads all tensors strictly, so nothing is silently missing.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.quant.config import QuantConfig
from lqlora_dagster.quant.matrix import QuantizedMatrix
from lqlora_dagster.surgery.injector import LayerInit, lq_layers, replace_with_lq
from lqlora_dagster.tasks import get_task

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


def _shell_init(spec: dict) -> LayerInit:
    rows, cols = spec["shape"]
    qm = QuantizedMatrix.quantize(torch.zeros(rows, cols), QuantConfig.parse(spec["config"]))
    return LayerInit(qm, torch.zeros(rows, spec["rank"]), torch.zeros(spec["rank"], cols))


def load_lq_model(folder: Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / LAYOUT).is_file():
        raise LQLoRAInputError(f"{folder} is not a saved LQ model (no {LAYOUT})")
    layout = json.loads((folder / LAYOUT).read_text())
    if layout.get("format_version") != FORMAT_VERSION:
        raise LQLoRAInputError(
            f"{folder} has LQ model format {layout.get('format_version')}, expected {FORMAT_VERSION}"
        )
    config = AutoConfig.from_pretrained(folder)
    # Built on CPU, not the meta device: non-persistent buffers (e.g. BERT's
    # position_ids) are not in the file and must be initialised by the constructor.
    model = get_task(layout["task"]).from_config(config)
    for name, spec in layout["layers"].items():
        replace_with_lq(model, {name: _shell_init(spec)}, scaling=spec["scaling"])
        layer = model.get_submodule(name)
        if not spec["bias"]:
            layer.bias = None
    model.tie_weights()
    missing, unexpected = load_model(model, str(folder / WEIGHTS), strict=False)
    real_missing = [k for k in missing if not _is_tied(model, k)]
    if real_missing or unexpected:
        raise LQLoRAInputError(
            f"{folder / WEIGHTS} does not match its layout: missing {real_missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.to(device).eval()


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    """A key missing from the file is fine when it is one of the tied embeddings
    (safetensors stores a shared tensor once, under either name)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or out.weight is not inp.weight:
        return False
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if p is inp.weight}
    return key in names
