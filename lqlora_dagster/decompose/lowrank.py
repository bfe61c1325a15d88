"""Rank-r factorisation A ~ L1 @ L2 with L1 = U sqrt(S), L2 = sqrt(S) V^T.

The randomized path is a seeded range finder with power iterations (Halko et al.),
written here rather than calling `torch.svd_lowrank` for two reasons: it takes a
`torch.Generator`, so results do not depend on global RNG state, and it can start
from a previous right basis, which is what the alternating LQ iterations need: the
residual's top subspace barely moves between iterations.
"""

from dataclasses import dataclass
from typing import Literal

import torch

SVDMethod = Literal["randomized", "full"]
SVD_METHODS: tuple[str, ...] = ("randomized", "full")


@dataclass(frozen=True)
class LowRank:
    L1: torch.Tensor  # (m, r)
    L2: torch.Tensor  # (r, n)

    def product(self) -> torch.Tensor:
        return self.L1 @ self.L2


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> LowRank:
    root = S[:rank].sqrt()
    return LowRank(U[:, :rank] * root, root[:, None] * Vh[:rank])


def full_low_rank(A: torch.Tensor, rank: int) -> LowRank:
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return _split(U, S, Vh, rank)


def randomized_low_rank(
    A: torch.Tensor,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
) -> tuple[LowRank, torch.Tensor]:
    """Randomized rank-`rank` SVD. Returns the factors and the (n, q) right basis
    to pass back as `start` on the next call."""
    m, n = A.shape
    q = min(rank + oversample, m, n)
    if start is None or start.shape != (n, q):
        start = torch.randn(n, q, generator=generator, dtype=A.dtype, device="cpu").to(A.device)
    Y = torch.linalg.qr(A @ start).Q  # (m, q)
    for _ in range(power_iters):
        Z = torch.linalg.qr(A.T @ Y).Q  # (n, q)
        Y = torch.linalg.qr(A @ Z).Q
    Ub, S, Vh = torch.linalg.svd(Y.T @ A, full_matrices=False)  # (q, n) problem
    return _split(Y @ Ub, S, Vh, rank), Vh.T.contiguous()


def low_rank(
    A: torch.Tensor,
    rank: int,
    method: SVDMethod = "randomized",
    *,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> LowRank:
    """One-shot rank-r factorisation by the chosen SVD."""
    if method == "full":
        return full_low_rank(A, rank)
    factors, _ = randomized_low_rank(
        A, rank, oversample=oversample, power_iters=power_iters, generator=generator
    )
    return factors
