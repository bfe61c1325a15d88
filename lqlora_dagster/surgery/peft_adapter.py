"""PEFT LoRA adapters of a model with factors (the merged and GGUF exports: `lqlora_dagster/export/`).

PEFT's LoRA computes base(x) + (alpha / r) * lora_B(lora_A(x)); ours computes
deq(Q) x + scaling * L1 L2 x. So lora_A = L2, lora_B = L1 and lora_alpha =
scaling * r: the adapter over the *dequantized* base reproduces our forward.
Ranks chosen per matrix travel as PEFT's `rank_pattern`/`alpha_pattern`; a rank-0
layer has no adapter (it is left out of `target_modules`).
"""

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.models.kinds import model_kind
from lqlora_dagster.surgery.injector import factor_layers, to_dense


def export_peft_adapter(
    model: torch.nn.Module,
    folder: Path,
    base_model_name_or_path: str = "",
    task: str = "causal-lm",
    head: str | None = None,
) -> Path:
    layers = {n: m for n, m in factor_layers(model).items() if m.rank > 0}
    if not layers:
        raise LQLoRAInputError("the model has no LQLinear or LoRALinear layers with factors to export as a LoRA adapter")
    ranks = [m.rank for m in layers.values()]
    rank = max(set(ranks), key=ranks.count)  # the most common; the others go in rank_pattern
    scaling = next(m.scaling for m in layers.values() if m.rank == rank)
    rank_pattern = {n: m.rank for n, m in layers.items() if m.rank != rank}
    alpha_pattern = {n: m.scaling * m.rank for n, m in layers.items() if m.scaling * m.rank != scaling * rank}
    transposed = {m.transposed for m in layers.values()}
    config = {
        "peft_type": "LORA",
        "task_type": model_kind(task).peft_type,
        "r": rank,
        "lora_alpha": scaling * rank,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "target_modules": sorted(layers),
        "bias": "none",
        "fan_in_fan_out": transposed == {True},
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": [head] if head else None,
    }
    tensors = {}
    for name, m in layers.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.L2.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.L1.detach().cpu().contiguous()
    if head:
        for pname, p in model.get_submodule(head).named_parameters():
            tensors[f"base_model.model.{head}.{pname}"] = p.detach().cpu().contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def dequantized_base(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with each LQLinear replaced by its dequantized Q alone: the base model a
    PEFT adapter exported from `model` applies to."""
    return to_dense(copy.deepcopy(model), merge=False)
