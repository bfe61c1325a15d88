"""`LQLinear`: y = x deq(Q)^T + scaling * (x L2^T) L1^T + bias.

Q is stored packed (buffers, so `.to(device)` and `state_dict` carry it) and
dequantized on the fly in the input's dtype. The frozen matmul is a custom autograd
function that dequantizes again in backward instead of keeping the dense weight
alive between forward and backward: memory stays at the packed size. A few rows of
input (generating tokens) go through the fused decode-and-multiply kernel of
`quant/fast_decode.py`, which reads only the packed bytes.
"""

import torch
from torch import nn

from lqlora_dagster.models.layer_types import layer_type_named
from lqlora_dagster.quant import fast_decode
from lqlora_dagster.quant.config import QuantConfig
from lqlora_dagster.quant.matrix import QuantizedMatrix

_PACKED = ("packed_codes", "packed_scale_codes", "group_scales", "scale_offset")


class _FrozenQuantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "LQLinear") -> torch.Tensor:
        ctx.layer = layer
        return layer.frozen_matmul(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out @ ctx.layer.transient_weight(grad_out.dtype), None


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

    def _packed(self) -> tuple[QuantizedMatrix, tuple | None]:
        """The packed matrix and its fast-path arguments, rebuilt only when a buffer was
        replaced, moved or written (a token's decode is too short to rebuild them each call)."""
        key = tuple((t.data_ptr(), t.device, t._version) for t in (getattr(self, n) for n in _PACKED))
        if getattr(self, "_packed_key", None) != key:
            qm = self.quantized()
            args = fast_decode.kernel_args(qm) if fast_decode.available(qm.packed_codes.device) else None
            self._packed_cache, self._packed_key = (qm, args), key
        return self._packed_cache

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        qm, args = self._packed()
        fast = fast_decode.dequantize(qm, args) if args is not None else None
        return qm.reference_dequantize(dtype) if fast is None else fast.to(dtype)  # (out, in)

    def transient_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight for one matmul: on the fast path it lives in a buffer shared by
        all layers (overwritten by the next decode), so a forward pass holds one at a time."""
        _, args = self._packed()
        if args is None or dtype != torch.float32:
            return self.dequantized_weight(dtype)
        return fast_decode.dequantize_scratch(args)

    def frozen_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x deq(Q)^T without autograd: fused for a few rows, else decode once and mm."""
        qm, args = self._packed()
        fused = fast_decode.matmul(x, qm, args) if args is not None else None
        return fused if fused is not None else x @ self.transient_weight(x.dtype).T

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        low_rank = self.scaling * (self.L1 @ self.L2)
        return (self.dequantized_weight(torch.float32) + low_rank).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self._inference(x)
        y = _FrozenQuantMatmul.apply(x, self) if x.requires_grad else self.frozen_matmul(x)  # Q never trains
        L1, L2 = self.L1, self.L2
        if L1.dtype != x.dtype:
            L1, L2 = L1.to(x.dtype), L2.to(x.dtype)
        y = y + self.scaling * ((x @ L2.T) @ L1.T)
        if self.bias is None:
            return y
        return y + (self.bias if self.bias.dtype == x.dtype else self.bias.to(x.dtype))

    def _inference(self, x: torch.Tensor) -> torch.Tensor:
        """No gradients: a few rows in one fused call; more rows decode Q once, and the
        low-rank part and bias are added in place (no extra passes over the output)."""
        qm, args = self._packed()
        if args is not None:
            fused = fast_decode.lq_linear(x, qm, args, self.L1, self.L2, self.scaling, self.bias)
            if fused is not None:
                return fused
        y = self.frozen_matmul(x)
        L1, L2 = self.L1.to(x.dtype), self.L2.to(x.dtype)
        flat = y.view(-1, self.out_features)
        flat.addmm_(x.reshape(-1, self.in_features) @ L2.T, L1.T, alpha=self.scaling)
        return y if self.bias is None else y.add_(self.bias.to(x.dtype))

    @property
    def transposed(self) -> bool:
        """The replaced layer stored its weight as (in, out) (GPT-2 Conv1D)."""
        return layer_type_named(self.layer_type).transposed

    @property
    def decomposed_layout(self) -> tuple[int, int, bool]:
        """(rows, cols, transposed) of the layer it replaced: how `find_targets` sees it."""
        return self.out_features, self.in_features, self.transposed

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, q={self.config.name}"
