"""Encode a matrix to NF codes with double-quantized block scales, and decode it back.

`encode` and `decode` are the single source of the quantization rule: simulated
quantization is `decode(encode(W))`, and the packed `QuantizedMatrix` stores exactly
the codes `encode` returns, so dequantizing it reproduces the simulation bit for bit.

Double quantization: block absmaxes a_j >= 0 are shifted by their minimum m (one fp32
per matrix), c_j = a_j - m >= 0, and quantized uniformly to b0 bits against their
group maximum g (stored in b1). Subtracting the minimum, not the mean, keeps c >= 0 so
all 2^b0 unsigned levels are used. Weights are then coded against the *dequantized*
block scale, so each code is the nearest level for the scale actually stored.
"""

from dataclasses import dataclass

import torch

from lqlora_dagster.quant.config import SCALE_FORMATS, QuantConfig
from lqlora_dagster.quant.normal_float import nearest_level, nf_codebook


@dataclass(frozen=True)
class Codes:
    """Unpacked quantization state of one matrix."""

    codes: torch.Tensor  # (n_blocks * B0,) uint8 weight codes, zero-padded
    scale_codes: torch.Tensor  # (n_groups * B1,) uint8 block-scale codes
    group_scales: torch.Tensor  # (n_groups,) in the b1 dtype
    scale_offset: torch.Tensor  # (1,) float32, the minimum block absmax
    shape: tuple[int, int]
    config: QuantConfig


def padded_sizes(numel: int, config: QuantConfig) -> tuple[int, int]:
    """(number of blocks, number of groups) after padding to whole blocks and groups."""
    n_blocks = -(-numel // config.B0)
    n_groups = -(-n_blocks // config.B1)
    return n_blocks, n_groups


def block_scales(
    scale_codes: torch.Tensor, group_scales: torch.Tensor, offset: torch.Tensor, config: QuantConfig
) -> torch.Tensor:
    """Dequantized block absmaxes, (n_groups * B1,) float32. Shared by encode and decode."""
    step = group_scales.to(torch.float32) / (2**config.b0 - 1)  # (n_groups,)
    per_block = scale_codes.to(torch.float32).reshape(-1, config.B1) * step[:, None]
    return (per_block + offset).reshape(-1)


def to_blocks(weight: torch.Tensor, B0: int) -> torch.Tensor:
    """(n_blocks, B0) float32 view of the flattened weight, zero-padded."""
    w = weight.detach().to(torch.float32).reshape(-1)
    n_blocks = -(-w.numel() // B0)
    return torch.nn.functional.pad(w, (0, n_blocks * B0 - w.numel())).reshape(n_blocks, B0)


def quantize_scales(
    absmax: torch.Tensor, config: QuantConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of block absmaxes: (scale codes, group scales, offset)."""
    n_blocks = absmax.numel()
    n_groups = -(-n_blocks // config.B1)
    offset = absmax.min().reshape(1)
    shifted = torch.nn.functional.pad(absmax - offset, (0, n_groups * config.B1 - n_blocks))
    shifted = shifted.reshape(n_groups, config.B1)
    group_scales = shifted.amax(dim=1).to(SCALE_FORMATS[config.b1])  # rounded to b1
    top = 2**config.b0 - 1
    g = group_scales.to(torch.float32)[:, None]
    safe_g = torch.where(g > 0, g, torch.ones_like(g))
    scale_codes = torch.round(shifted / safe_g * top).clamp_(0, top)
    scale_codes = torch.where(g > 0, scale_codes, torch.zeros_like(scale_codes)).to(torch.uint8)
    return scale_codes.reshape(-1), group_scales, offset


def code_blocks(blocks: torch.Tensor, scales: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Nearest-level codes of each block against its (dequantized) scale, (n_blocks, B0)."""
    zero_code = int(torch.nonzero(levels == 0)[0])
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = nearest_level(blocks / safe, levels)
    return torch.where(scales > 0, codes, torch.full_like(codes, zero_code))


def encode(weight: torch.Tensor, config: QuantConfig) -> Codes:
    """Quantize a 2-D tensor (any shape, any float dtype) to unpacked codes."""
    m, n = weight.shape
    blocks = to_blocks(weight, config.B0)
    scale_codes, group_scales, offset = quantize_scales(blocks.abs().amax(dim=1), config)
    scales = block_scales(scale_codes, group_scales, offset, config)[: len(blocks), None]
    codes = code_blocks(blocks, scales, nf_codebook(config.b, device=blocks.device)).reshape(-1)
    return Codes(codes, scale_codes, group_scales, offset, (m, n), config)


def decode(c: Codes, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize codes back to an (m, n) tensor."""
    cfg = c.config
    levels = nf_codebook(cfg.b, device=c.codes.device)
    n_blocks = c.codes.numel() // cfg.B0
    scales = block_scales(c.scale_codes, c.group_scales, c.scale_offset, cfg)[:n_blocks, None]
    values = levels[c.codes.long()].reshape(n_blocks, cfg.B0) * scales
    m, n = c.shape
    return values.reshape(-1)[: m * n].reshape(m, n).to(dtype)


def simulate(weight: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """What `weight` becomes after quantization with `config`, float32, same shape."""
    return decode(encode(weight, config))
