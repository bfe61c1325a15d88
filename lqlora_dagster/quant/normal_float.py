"""NormalFloat codebooks (QLoRA's NF-k data type), generalised to k bits.

The 2^k levels are quantiles of N(0, 1) rescaled to [-1, 1]: 2^(k-1) positive levels,
2^(k-1) - 1 negative levels and an exact zero, so that zero (padding, pruned weights)
round-trips exactly; the extreme levels are exactly -1 and +1.
"""

from functools import cache

import torch

from lqlora_dagster.errors import LQLoRAInputError

SUPPORTED_BITS = (2, 3, 4, 8)


def _tail_offset(bits: int) -> float:
    """Outermost quantile used. For k=4 this is QLoRA's 0.9677 = 1 - (1/32 + 1/30) / 2."""
    n = 2**bits
    return 1.0 - 0.5 * (1.0 / (2 * n) + 1.0 / (2 * (n - 1)))


@cache
def _codebook_cpu(bits: int) -> torch.Tensor:
    offset = torch.tensor(_tail_offset(bits), dtype=torch.float64)
    n_pos, n_neg = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    pos = torch.special.ndtri(torch.linspace(offset.item(), 0.5, n_pos + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset.item(), 0.5, n_neg + 1, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    levels = torch.sort(levels / levels.max()).values
    return levels.to(torch.float32)


def nf_codebook(bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Sorted NF-`bits` levels, shape (2**bits,), float32, in [-1, 1] with one exact 0."""
    if bits not in SUPPORTED_BITS:
        raise LQLoRAInputError(
            f"unknown NormalFloat bit width {bits!r}; supported widths are {SUPPORTED_BITS}"
        )
    return _codebook_cpu(bits).to(device) if device is not None else _codebook_cpu(bits)


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for every element of `x` (ties go to the lower level).

    `levels` must be sorted. Works by bucketizing against the midpoints, which is exact
    and O(n log L) instead of an (n, L) distance matrix.
    """
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x, mids, right=False).to(torch.uint8)
