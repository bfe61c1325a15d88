"""Put `LQLinear` layers into any HF model by module name, and take them out again.

`replace_with_lq` swaps each target (nn.Linear or GPT-2 Conv1D) for an LQLinear built
from its decomposition. `to_dense` builds plain layers back (dequantized Q, or Q + L1 L2
merged) so PEFT and plain transformers can load the result.
"""

from dataclasses import dataclass

import torch
from torch import nn

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.quant.matrix import QuantizedMatrix
from lqlora_dagster.surgery.lq_linear import LQLinear


@dataclass(frozen=True)
class LayerInit:
    quantized: QuantizedMatrix
    L1: torch.Tensor  # (out, r)
    L2: torch.Tensor  # (r, in)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
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
        if not (isinstance(old, nn.Linear) or type(old).__name__ == "Conv1D"):
            raise LQLoRAInputError(
                f"module {name!r} is a {type(old).__name__}; only Linear/Conv1D can be replaced"
            )
        bias = getattr(old, "bias", None)
        device = old.weight.device
        transposed = not isinstance(old, nn.Linear)
        layer = LQLinear(
            init.quantized.to(device), init.L1.to(device), init.L2.to(device), bias, scaling, transposed
        )
        _set_submodule(model, name, layer)
    return model


def lq_layers(model: nn.Module) -> dict[str, LQLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LQLinear)}


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


def _dense_layer(layer: LQLinear, weight: torch.Tensor) -> nn.Module:
    """A layer of the type that was replaced (Linear, or Conv1D with weight (in, out))."""
    if layer.transposed:
        from transformers.pytorch_utils import Conv1D

        dense = Conv1D(layer.out_features, layer.in_features)
        weight = weight.T
    else:
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    dense = dense.to(weight.device)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    return dense


def to_dense(model: nn.Module, merge: bool) -> nn.Module:
    """Replace each LQLinear in place by the original layer type holding deq(Q)
    (merge=False) or deq(Q) + scaling L1 L2 (merge=True), fp32. Returns the model."""
    for name, layer in lq_layers(model).items():
        with torch.no_grad():
            weight = layer.merged_weight() if merge else layer.dequantized_weight()
        _set_submodule(model, name, _dense_layer(layer, weight))
    return model
