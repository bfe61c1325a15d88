"""Quantization error of one matrix under many configs at once.

Configs that share (b, B0) share the blocks and their absmaxes; only the
double-quantized scales differ. The blocking is done once and each config costs
one table-based quantization pass (see `lut.py`).
"""

import torch

from lqlora_dagster.quant.codec import to_blocks
from lqlora_dagster.quant.config import QuantConfig
from lqlora_dagster.quant.lut import BlockQuantizer


def quantization_errors(
    R: torch.Tensor, configs: list[QuantConfig], weights: torch.Tensor | None = None
) -> list[float]:
    """[sum w * (R - simulate(R, c))^2 for c in configs]; all configs share b and B0."""
    if not configs:
        return []
    b, B0 = configs[0].b, configs[0].B0
    if any(c.b != b or c.B0 != B0 for c in configs):
        raise ValueError("quantization_errors needs configs that share b and B0")
    n = R.numel()
    quantizer = BlockQuantizer(to_blocks(R, B0))
    flat = quantizer.blocks.view(-1)[:n]
    w = to_blocks(weights, B0).view(-1)[:n] if weights is not None else None
    out = []
    for c in configs:
        d = quantizer.dequantized(c).view(-1)[:n].sub_(flat)
        out.append(float(torch.dot(d * d, w) if w is not None else torch.dot(d, d)))
    return out
