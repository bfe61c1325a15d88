"""`LoRALinear`: y = x W^T + scaling * (x L2^T) L1^T + bias, W the dense frozen weight.

The fair upper line of every comparison: the uncompressed model finetuned with the
same LoRA recipe (rank, steps, data) as the compressed ones. Factors start as LoRA's
(L2 random, L1 = 0), so the model begins exactly at the base model; names (`L1`,
`L2`) match `LQLinear`'s, so training, PEFT export and loading treat both alike.
"""

import math

import torch
from torch import nn

from lqlora_dagster.models.layer_types import layer_type_named, layer_type_of


class LoRALinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rank: int, scaling: float,
                 layer_type: str, generator: torch.Generator):
        super().__init__()
        self.layer_type = layer_type
        self.out_features, self.in_features = weight.shape
        self.rank = rank
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)  # (out, in)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform(a=sqrt(5)), LoRA's init of A
        L2 = (torch.rand(rank, self.in_features, generator=generator) * 2 - 1) * bound
        self.L1 = nn.Parameter(torch.zeros(self.out_features, rank, dtype=weight.dtype, device=weight.device))
        self.L2 = nn.Parameter(L2.to(weight.dtype).to(weight.device))  # (r, in)
        self.scaling = float(scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T + self.scaling * ((x @ self.L2.T) @ self.L1.T)
        return y if self.bias is None else y + self.bias

    @property
    def transposed(self) -> bool:
        return layer_type_named(self.layer_type).transposed


def add_lora(model: nn.Module, names: list[str], rank: int, scaling: float = 1.0, seed: int = 0) -> nn.Module:
    """Wrap each named dense layer (nn.Linear, Conv1D) in a LoRALinear, in place."""
    generator = torch.Generator().manual_seed(seed)
    for name in names:
        old = model.get_submodule(name)
        kind = layer_type_of(old)
        weight = old.weight.T if kind.transposed else old.weight
        model.set_submodule(name, LoRALinear(weight, getattr(old, "bias", None), rank, scaling, kind.name, generator))
    return model
