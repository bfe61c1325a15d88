"""Quantization configurations (b, b0, b1, B0, B1) and the paper's 432-config grid.

A config says how one matrix is stored: b-bit NormalFloat codes in blocks of B0, the
block absmaxes quantized to b0 bits in groups of B1, and each group's scale kept in the
float format b1. Its cost in bits per parameter is b + b0/B0 + b1/(B0*B1).
"""

from dataclasses import dataclass
from itertools import product

import torch

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.quant.normal_float import SUPPORTED_BITS

SCALE_FORMATS: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
SCALE_FORMAT_BITS = {"bf16": 16, "fp16": 16, "fp32": 32}
SCALE_CODE_BITS = (2, 3, 4, 8)


@dataclass(frozen=True, order=True)
class QuantConfig:
    """One storage format for a matrix. Field names follow the paper."""

    b: int  # bits per weight code (NormalFloat)
    b0: int  # bits per block-absmax code
    b1: str  # float format of each group's scale: "bf16", "fp16" or "fp32"
    B0: int  # weights per block
    B1: int  # blocks per group

    def __post_init__(self) -> None:
        if self.b not in SUPPORTED_BITS:
            raise LQLoRAInputError(
                f"unknown bit width b={self.b!r}; supported NormalFloat widths are {SUPPORTED_BITS}"
            )
        if self.b0 not in SCALE_CODE_BITS:
            raise LQLoRAInputError(
                f"unknown scale bit width b0={self.b0!r}; supported widths are {SCALE_CODE_BITS}"
            )
        if self.b1 not in SCALE_FORMATS:
            raise LQLoRAInputError(f"unknown scale format b1={self.b1!r}; use one of {sorted(SCALE_FORMATS)}")
        for name in ("B0", "B1"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LQLoRAInputError(f"block size {name}={value!r} must be a positive integer")

    @property
    def bits_per_param(self) -> float:
        """Storage cost by the paper's formula (no padding): b + b0/B0 + b1/(B0*B1)."""
        return self.b + self.b0 / self.B0 + SCALE_FORMAT_BITS[self.b1] / (self.B0 * self.B1)

    @property
    def name(self) -> str:
        return f"nf{self.b}-b0{self.b0}-{self.b1}-B0{self.B0}-B1{self.B1}"

    @classmethod
    def parse(cls, name: str) -> "QuantConfig":
        """Inverse of `.name`, for configs read back from SQL or the CLI."""
        try:
            nf, b0, b1, B0, B1 = name.split("-")
            return cls(int(nf[2:]), int(b0[2:]), b1, int(B0[2:]), int(B1[2:]))
        except (ValueError, IndexError) as err:
            raise LQLoRAInputError(
                f"cannot parse config name {name!r}; expected e.g. 'nf4-b08-fp32-B064-B1256'"
            ) from err


# QLoRA's NF4 with double quantization: 4 + 8/64 + 32/(64*256) = 4.127 bits/param.
QLORA_NF4 = QuantConfig(b=4, b0=8, b1="fp32", B0=64, B1=256)
QLORA_NF3 = QuantConfig(b=3, b0=8, b1="fp32", B0=64, B1=256)

# The paper's ILP search space: 4 x 4 x 3 x 3 x 3 = 432 configs.
CONFIG_GRID: tuple[QuantConfig, ...] = tuple(
    QuantConfig(b, b0, b1, B0, B1)
    for b, b0, b1, B0, B1 in product(
        (2, 3, 4, 8), (2, 3, 4, 8), ("bf16", "fp16", "fp32"), (16, 32, 64), (16, 64, 256)
    )
)

# A 24-config slice of the grid for quick runs: every b with the cheapest and the most
# accurate scale storage at each block size. Same accounting and ILP as the full grid.
REDUCED_GRID: tuple[QuantConfig, ...] = tuple(
    c for c in CONFIG_GRID if c.b1 == "fp16" and c.B1 == 64 and c.b0 in (3, 8) and c.B0 in (16, 32, 64)
)


HEADER_BITS = 32  # the fp32 scale offset every packed matrix stores once


def storage_bits(numel: int, config: QuantConfig) -> int:
    """Bits to store `numel` weights as a packed matrix holds them: padding to whole
    blocks and groups and the per-matrix header counted, so a plan's bits/param is the
    bits/param of the matrices it produces (`QuantizedMatrix.nbytes`)."""
    n_blocks = -(-numel // config.B0)
    n_groups = -(-n_blocks // config.B1)
    return (
        n_blocks * config.B0 * config.b
        + n_groups * config.B1 * config.b0
        + n_groups * SCALE_FORMAT_BITS[config.b1]
        + HEADER_BITS
    )
