"""Quantization error of one matrix under many configs at once.

Configs that share (b, B0) share the blocks and their absmaxes; only the
double-quantized scales differ. The blocking is done once and each config costs
one table-based quantization pass (see `lut.py`; on the CPU one compiled pass, which
also forms the squared error).
"""

import torch

from lqlora_dagster.quant.codec import to_blocks
from lqlora_dagster.quant.config import QuantConfig
from lqlora_dagster.quant.lut import BlockQuantizer, level_table, native_scales, native_steps


def quantization_errors(
    R: torch.Tensor, configs: list[QuantConfig], weights: torch.Tensor | None = None
) -> list[float]:
    """[sum w * (R - simulate(R, c))^2 for c in configs]; all configs share b and B0."""
    if not configs:
        return []
    b, B0 = configs[0].b, configs[0].B0
    if any(c.b != b or c.B0 != B0 for c in configs):
        raise ValueError("quantization_errors needs configs that share b and B0")
    native = native_steps(R.device)
    if native is not None:
        return _native_errors(native, R, configs, weights)
    n = R.numel()
    quantizer = BlockQuantizer(to_blocks(R, B0))
    flat = quantizer.blocks.view(-1)[:n]
    w = to_blocks(weights, B0).view(-1)[:n] if weights is not None else None
    out = []
    for c in configs:
        d = quantizer.dequantized(c).view(-1)[:n].sub_(flat)
        out.append(float(torch.dot(d * d, w) if w is not None else torch.dot(d, d)))
    return out


def _native_errors(native, R: torch.Tensor, configs: list[QuantConfig], weights: torch.Tensor | None) -> list[float]:
    """The same sums from the compiled kernel: same roundings, same BLAS dot at the end."""
    B0 = configs[0].B0
    X = R.detach().to(torch.float32).contiguous().view(-1)
    w = weights.detach().to(torch.float32).contiguous().view(-1) if weights is not None else None
    absmax = native.block_absmax(X, B0)
    scratch = torch.empty_like(X)
    out = []
    for c in configs:
        t, scales = native_scales(absmax, c)
        table = level_table(c.b, X.device)
        if w is not None:  # sum w * d^2, d^2 rounded first (as d * d is)
            native.lut_squared_error(X, t, scales, table, B0, scratch)
            out.append(float(torch.dot(scratch, w)))
        else:  # dot(d, d), as the torch path sums it
            native.lut_quantize(X, t, scales, table, B0, scratch)
            d = scratch.sub_(X)
            out.append(float(torch.dot(d, d)))
    return out
