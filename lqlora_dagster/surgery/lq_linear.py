"""`LQLinear`: y = x deq(Q)^T + scaling * (x L2^T) L1^T + bias.

Q is stored packed (buffers, so `.to(device)` and `state_dict` carry it) and
dequantized on the fly in the input's dtype. The frozen matmul is a custom autograd
function that dequantizes again in backward instead of keeping the dense weight
alive between forward and backward: memory stays at the packed size.
"""

import torch
from torch import nn

from lqlora_dagster.models.layer_types import layer_type_named
from lqlora_dagster.quant.config import QuantConfig
from lqlora_dagster.quant.matrix import QuantizedMatrix

_PACKED = ("packed_codes", "packed_scale_codes", "group_scales", "scale_offset")


class _FrozenQuantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "LQLinear") -> torch.Tensor:
        ctx.layer = layer
        return x @ layer.dequantized_weight(x.dtype).T

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out @ ctx.layer.dequantized_weight(grad_out.dtype), None


class LQLinear(nn.Module):
    def __init__(
        self,
        quantized: QuantizedMatrix,
        L1: torch.Tensor,
        L2: torch.Tensor,
        bias: torch.Tensor | None = None,
        scaling: float = 1.0,
        layer_type: str = "Linear",
    ):
        super().__init__()
        self.layer_type = layer_type  # what it replaced (models/layer_types.py), rebuilt by to_dense
        self.out_features, self.in_features = quantized.shape
        self.rank = L1.shape[1]
        if L1.shape != (self.out_features, self.rank) or L2.shape != (self.rank, self.in_features):
            raise ValueError(
                f"factors {tuple(L1.shape)} @ {tuple(L2.shape)} do not fit a {quantized.shape} weight"
            )
        self.config: QuantConfig = quantized.config
        for name, tensor in zip(_PACKED, quantized._buffers()):
            self.register_buffer(name, tensor.detach().clone())
        self.L1 = nn.Parameter(L1.detach().clone().to(torch.float32))  # (out, r)
        self.L2 = nn.Parameter(L2.detach().clone().to(torch.float32))  # (r, in)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.scaling = float(scaling)

    def quantized(self) -> QuantizedMatrix:
        buffers = [getattr(self, name) for name in _PACKED]
        return QuantizedMatrix(*buffers, (self.out_features, self.in_features), self.config)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized().dequantize(dtype)  # (out, in)

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        low_rank = self.scaling * (self.L1 @ self.L2)
        return (self.dequantized_weight(torch.float32) + low_rank).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FrozenQuantMatmul.apply(x, self)
        y = y + self.scaling * ((x @ self.L2.to(x.dtype).T) @ self.L1.to(x.dtype).T)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @property
    def transposed(self) -> bool:
        """The replaced layer stored its weight as (in, out) (GPT-2 Conv1D)."""
        return layer_type_named(self.layer_type).transposed

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, q={self.config.name}"
