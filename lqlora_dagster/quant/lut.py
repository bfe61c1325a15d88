"""Fast simulated quantization for error tables, by a fine lookup table.

Exact nearest-level search (`bucketize`) is the slowest step of quantizing on CPU.
Here a normalised weight y = x / scale in [-1, 1] indexes one of LUT_BINS uniform
bins whose entry is the NF level nearest the bin centre. Only values inside the
2^b - 1 bins that straddle a midpoint between levels can land on the neighbouring
level, and there both levels are (almost) equally far away, so the error moves by
~1e-6 relative (1e-4 for NF8). Scales and their double quantization are exact.
The LQ loop quantizes with it at every step; stored Q always comes from `codec.encode`
(of the chosen iterate's input, once). On the CPU the passes over the matrix run in one
compiled kernel (`kernels/lq_step.cpp`), with the same roundings as the torch sequence
here, which serves the GPU and machines without a compiler.
"""

from functools import cache

import torch

from lqlora_dagster.quant.codec import block_scales, quantize_scales
from lqlora_dagster.quant.config import QuantConfig
from lqlora_dagster.quant.native_build import load_extension
from lqlora_dagster.quant.normal_float import nf_codebook

LUT_BINS = 8192


@cache
def _table_cpu(bits: int) -> torch.Tensor:
    levels = nf_codebook(bits)
    mids = (levels[1:] + levels[:-1]) / 2
    centers = ((torch.arange(LUT_BINS, dtype=torch.float64) + 0.5) * (2.0 / LUT_BINS) - 1).to(torch.float32)
    return levels[torch.bucketize(centers, mids)]


def level_table(bits: int, device: torch.device) -> torch.Tensor:
    return _table_cpu(bits).to(device)


@cache
def _native():
    return load_extension("lqlora_lq_step", "lq_step.cpp", "LQLORA_LQ_KERNEL")


def native_steps(device: torch.device):
    """The compiled elementwise steps for tensors on `device`, or None (then pure torch)."""
    return _native() if device.type == "cpu" else None


def native_scales(absmax: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, scale) per block for the kernel: BINS/2 over the (nonzero) scale, and the
    double-quantized scale, with the roundings of `BlockQuantizer.dequantized`."""
    t, scales = _native().block_scales(absmax, config.b0, _FORMAT_CODES[config.b1], config.B1, LUT_BINS)
    return t, scales


_FORMAT_CODES = {"fp32": 0, "fp16": 1, "bf16": 2}  # the kernel's names for the b1 formats


def block_scales_for(absmax: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """(n_blocks, 1) dequantized double-quantized scales, exactly as `encode` uses."""
    scale_codes, group_scales, offset = quantize_scales(absmax, config)
    return block_scales(scale_codes, group_scales, offset, config)[: len(absmax), None]


class BlockQuantizer:
    """Table-based quantization of (n_blocks, B0) blocks under any config with that B0,
    reusing its buffers across configs and calls (allocation dominates otherwise)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks
        self.absmax = blocks.abs().amax(dim=1)
        self._y = torch.empty_like(blocks)
        self._half = torch.full_like(blocks, LUT_BINS / 2)
        self._idx = torch.empty(blocks.shape, dtype=torch.int32, device=blocks.device)
        self._deq = torch.empty_like(blocks)

    def load(self, W: torch.Tensor) -> None:
        """Quantize a new matrix of the same size next (copied into the block buffer)."""
        flat = self.blocks.view(-1)
        flat[: W.numel()].copy_(W.reshape(-1))
        flat[W.numel() :].zero_()
        torch.amax(self.blocks.abs(), dim=1, out=self.absmax)

    def dequantized(self, config: QuantConfig) -> torch.Tensor:
        """(n_blocks, B0) quantized values; valid until the next call."""
        scales = block_scales_for(self.absmax, config)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        torch.addcmul(self._half, self.blocks, ((LUT_BINS / 2) / safe).expand_as(self.blocks), out=self._y)
        self._idx.copy_(self._y.clamp_(0, LUT_BINS - 1))
        table = level_table(config.b, self.blocks.device)
        torch.index_select(table, 0, self._idx.view(-1), out=self._deq.view(-1))
        return self._deq.mul_(scales)


class RepeatedQuantizer:
    """Table-based simulated quantization of many matrices of one shape under one
    config (the LQ loop): buffers are allocated once. The returned tensor is reused by
    the next call."""

    def __init__(self, shape: tuple[int, int], config: QuantConfig, device: torch.device):
        self.config, self.shape, self.n = config, shape, shape[0] * shape[1]
        self._native = native_steps(device)
        if self._native is not None:
            self._out = torch.empty(shape, device=device)
            self._table = level_table(config.b, device)
        else:
            n_blocks = -(-self.n // config.B0)
            self._q = BlockQuantizer(torch.zeros(n_blocks, config.B0, device=device))

    def __call__(self, W: torch.Tensor) -> torch.Tensor:
        if self._native is not None:
            X = W.contiguous()
            return self._quantized(X, self._native.block_absmax(X, self.config.B0))
        self._q.load(W)
        return self._q.dequantized(self.config).view(-1)[: self.n].view(self.shape)

    def difference(self, W: torch.Tensor, LR: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Quantize W - LR, formed in `out` (which then holds the quantizer's input)."""
        if self._native is not None:
            return self._quantized(out, self._native.sub_absmax(W, LR, out, self.config.B0))
        return self(torch.sub(W, LR, out=out))

    def _quantized(self, X: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        t, scales = native_scales(absmax, self.config)
        self._native.lut_quantize(X, t, scales, self._table, self.config.B0, self._out)
        return self._out
