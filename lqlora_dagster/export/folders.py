"""The Hugging Face folders an export starts from: the merged model, and its twin whose
target weights are the Fisher diagonal (zero elsewhere).

The twin goes through llama.cpp's converter exactly as the model does, so whatever the
converter does to a tensor (renaming it, re-ordering the rows of attention projections
for llama.cpp's rotary layout, splitting or joining) it does to the Fisher weights as
well: each target of the GGUF file gets its Fisher weights in its own layout, for every
architecture the converter knows, without this package knowing any of them.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lqlora_dagster.errors import LQLoRAInputError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def write_merged(model: torch.nn.Module, tokenizer, folder: Path, dtype: str = "fp32") -> Path:
    """`model` (dense: every factor merged) as a plain transformers folder: safetensors,
    config, generation config, tokenizer and its chat template."""
    folder = Path(folder)
    model.to(DTYPES[dtype]).save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def weight_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise LQLoRAInputError(f"{folder} holds no .safetensors weights")
    return files


def write_fisher_twin(merged: Path, fisher: dict[str, torch.Tensor], out: Path) -> Path:
    """A copy of `merged` whose `<target>.weight` tensors hold the Fisher diagonal (in the
    stored layout: transposed for Conv1D) and every other tensor zeros. Targets without a
    Fisher tensor get ones (equal weights)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for item in Path(merged).iterdir():
        if item.suffix != ".safetensors" and item.is_file():
            shutil.copy2(item, out / item.name)
    found = set()
    for file in weight_files(merged):
        tensors = {}
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                weight = f.get_tensor(key)
                name = key.removesuffix(".weight")
                if key.endswith(".weight") and name in fisher:
                    found.add(name)
                    diag = fisher[name].float()
                    if diag.shape != weight.shape and diag.T.shape == weight.shape:
                        diag = diag.T
                    if diag.shape != weight.shape:
                        raise ValueError(f"the Fisher diagonal of {name} has shape {tuple(diag.shape)}, "
                                         f"its weight {tuple(weight.shape)}")
                    tensors[key] = (diag.clamp_min(0) + 1e-30).contiguous()  # non-zero: marks a target
                else:
                    tensors[key] = torch.zeros(weight.shape, dtype=torch.float32)
        save_file(tensors, str(out / file.name), metadata={"format": "pt"})
    missing = sorted(set(fisher) - found)
    if missing:
        raise ValueError(f"no weight in {merged} for the targets {missing[:3]}")
    index = Path(merged) / "model.safetensors.index.json"
    if index.is_file():  # shard names are kept, so the index stays valid as copied
        json.loads(index.read_text())
    return out


def unit_fisher(targets: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Equal weights for each target (out, in): the plain squared error."""
    return {name: torch.ones(shape) for name, shape in targets.items()}
