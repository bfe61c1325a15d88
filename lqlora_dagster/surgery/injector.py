"""Put `LQLinear` layers into any HF model by module name, and take them out again.

`replace_with_lq` swaps each target (any layer type of `models/layer_types.py`) for an
LQLinear built from its decomposition. `to_dense` builds layers of the original type
back (dequantized Q, or Q + L1 L2 merged) so PEFT and plain transformers load the result.
"""

from dataclasses import dataclass

import torch
from torch import nn

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.models.layer_types import LAYER_TYPES, layer_type_named, layer_type_of
from lqlora_dagster.quant.matrix import QuantizedMatrix
from lqlora_dagster.surgery.lora_linear import LoRALinear
from lqlora_dagster.surgery.lq_linear import LQLinear


@dataclass(frozen=True)
class LayerInit:
    quantized: QuantizedMatrix
    L1: torch.Tensor  # (out, r)
    L2: torch.Tensor  # (r, in)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_with_lq(model: nn.Module, inits: dict[str, LayerInit], scaling: float = 1.0) -> nn.Module:
    """Replace every named target in place; returns the model."""
    for name, init in inits.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as err:
            raise LQLoRAInputError(f"the model has no module {name!r} to replace") from err
        kind = layer_type_of(old)
        if kind is None:
            raise LQLoRAInputError(
                f"module {name!r} is a {type(old).__name__}; only {', '.join(t.name for t in LAYER_TYPES)} "
                "can be replaced"
            )
        bias = getattr(old, "bias", None)
        # a layer whose weight was never loaded (meta) takes the decomposition's device
        device = init.quantized.packed_codes.device if old.weight.is_meta else old.weight.device
        layer = LQLinear(
            init.quantized.to(device), init.L1.to(device), init.L2.to(device), bias, scaling, kind.name
        )
        set_submodule(model, name, layer)
    return model


def lq_layers(model: nn.Module) -> dict[str, LQLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LQLinear)}


def factor_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer with trainable factors L1, L2: LQLinear, or LoRALinear over a dense weight."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (LQLinear, LoRALinear))}


def mark_trainable(model: nn.Module, head: str | None = None) -> list[str]:
    """Freeze everything but L1, L2 (and parameters under module `head`, e.g.
    "classifier"). Returns the names of trainable parameters."""
    trainable = []
    for name, p in model.named_parameters():
        train = (
            name.endswith(".L1") or name.endswith(".L2") or (head is not None and name.startswith(head + "."))
        )
        p.requires_grad_(train)
        if train:
            trainable.append(name)
    if head is not None and not any(n.startswith(head + ".") for n in trainable):
        raise LQLoRAInputError(f"task head {head!r} has no parameters in this model")
    return trainable


def to_dense(model: nn.Module, merge: bool) -> nn.Module:
    """Replace each factor layer in place by the original layer type holding its base
    (deq(Q) for an LQLinear, the frozen weight for a LoRALinear; merge=False) or the base
    plus scaling L1 L2 (merge=True), fp32. Returns the model."""
    for name, layer in factor_layers(model).items():
        with torch.no_grad():
            base = layer.dequantized_weight() if isinstance(layer, LQLinear) else layer.weight.float()
            weight = base + layer.scaling * (layer.L1.float() @ layer.L2.float()) if merge else base
        bias = layer.bias.detach() if layer.bias is not None else None
        set_submodule(model, name, layer_type_named(layer.layer_type).dense(weight, bias))
    return model
