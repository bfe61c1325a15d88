"""The layer types a target can be, as data: how to recognise one, read its (out, in)
shape and weight, and build a plain one back from a dense weight.

| type         | weight stored | where                      |
| nn.Linear    | (out, in)     | almost every architecture  |
| GPT-2 Conv1D | (in, out)     | GPT-2 family (transformers) |

A new layer type is one entry in `LAYER_TYPES` (plus its tests).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def _conv1d_class() -> type | None:
    try:
        # transformers loads on first use (0.6 s): commands that read no model skip it
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers absent: no GPT-2 layers to meet either
        return None
    return Conv1D


def _is_conv1d(module: nn.Module) -> bool:
    cls = _conv1d_class()
    return cls is not None and isinstance(module, cls)


def _new_linear(rows: int, cols: int, bias: bool) -> nn.Module:
    return nn.Linear(cols, rows, bias=bias)


def _new_conv1d(rows: int, cols: int, bias: bool) -> nn.Module:
    return _conv1d_class()(rows, cols)


@dataclass(frozen=True)
class LayerType:
    name: str
    matches: Callable[[nn.Module], bool]
    transposed: bool  # weight stored as (in, out)
    new: Callable[[int, int, bool], nn.Module]  # (rows, cols, bias) -> an empty layer

    def shape(self, module: nn.Module) -> tuple[int, int]:
        """(out features, in features)."""
        rows, cols = module.weight.shape
        return (cols, rows) if self.transposed else (rows, cols)

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The (out, in) weight, a view."""
        return module.weight.T if self.transposed else module.weight

    def dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        """A plain layer of this type holding `weight` (out, in) and `bias`."""
        rows, cols = weight.shape
        layer = self.new(rows, cols, bias is not None).to(weight.device)
        with torch.no_grad():
            layer.weight.copy_(weight.T if self.transposed else weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer


LAYER_TYPES: tuple[LayerType, ...] = (
    LayerType("Linear", lambda m: isinstance(m, nn.Linear), False, _new_linear),
    LayerType("Conv1D", _is_conv1d, True, _new_conv1d),
)


def layer_type_of(module: nn.Module) -> LayerType | None:
    """The registered type of a module, or None if it cannot be a target."""
    return next((t for t in LAYER_TYPES if t.matches(module)), None)


def layer_type_named(name: str) -> LayerType:
    return next(t for t in LAYER_TYPES if t.name == name)
