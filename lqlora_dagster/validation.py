"""Input checks shared by the public entry points, so bad input fails with a message
that names the offending value instead of a traceback from deep inside torch."""

import torch

from lqlora_dagster.errors import LQLoRAInputError


def check_matrix(weight: object, what: str = "weight") -> torch.Tensor:
    """A finite, non-empty, floating 2-D tensor, or a clear error."""
    if not isinstance(weight, torch.Tensor):
        raise LQLoRAInputError(f"{what} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise LQLoRAInputError(
            f"{what} must be a 2-D matrix, got shape {tuple(weight.shape)}; "
            "reshape it (e.g. conv kernels to (out, in*k*k)) before quantizing"
        )
    if weight.numel() == 0:
        raise LQLoRAInputError(f"{what} is empty (shape {tuple(weight.shape)})")
    if not weight.is_floating_point():
        raise LQLoRAInputError(f"{what} must be a floating-point tensor, got {weight.dtype}")
    bad = ~torch.isfinite(weight)
    if bool(bad.any()):
        n_nan = int(torch.isnan(weight).sum())
        n_inf = int(bad.sum()) - n_nan
        raise LQLoRAInputError(
            f"{what} has {n_nan} NaN and {n_inf} Inf values (shape {tuple(weight.shape)}); "
            "the checkpoint is corrupt or was saved after a diverged step"
        )
    return weight


def check_rank(rank: int, shape: tuple[int, int]) -> int:
    """A low-rank dimension 1 <= rank < min(m, n)."""
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise LQLoRAInputError(f"rank must be an integer, got {rank!r}")
    limit = min(shape)
    if rank < 1 or rank >= limit:
        raise LQLoRAInputError(
            f"rank {rank} is out of range for a {shape[0]}x{shape[1]} matrix; use 1 <= rank < {limit}"
        )
    return rank
