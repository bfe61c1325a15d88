"""Turn a Fisher diagonal into the row/column weights of the data-aware decomposition.

The weighted low-rank problem min ||sqrt(F) * (R - L1 L2)||_F has no closed form; the
paper approximates F by the rank-1 matrix D_row D_col^T, for which it does:
SVD of diag(D_row) R diag(D_col), then unscale the factors.
"""

from dataclasses import dataclass

import torch

from lqlora_dagster.errors import LQLoRAInputError


@dataclass(frozen=True)
class RowColWeights:
    row: torch.Tensor  # (m,) D_row = sqrt(mean_j F_ij)
    col: torch.Tensor  # (n,) D_col = sqrt(mean_i F_ij)

    def scale(self, R: torch.Tensor) -> torch.Tensor:
        return self.row[:, None] * R * self.col[None, :]

    def unscale(self, L1: torch.Tensor, L2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return L1 / self.row[:, None], L2 / self.col[None, :]


def check_fisher(fisher: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    if not isinstance(fisher, torch.Tensor) or tuple(fisher.shape) != tuple(shape):
        seen = tuple(fisher.shape) if isinstance(fisher, torch.Tensor) else type(fisher).__name__
        raise LQLoRAInputError(f"Fisher diagonal must have the weight's shape {tuple(shape)}, got {seen}")
    if not bool(torch.isfinite(fisher).all()) or bool((fisher < 0).any()):
        raise LQLoRAInputError("Fisher diagonal must be finite and >= 0 (it is a mean of squared gradients)")
    if float(fisher.sum()) == 0.0:
        raise LQLoRAInputError(
            "Fisher diagonal is all zero: the calibration gradients never reached this matrix"
        )
    return fisher


def row_col_weights(fisher: torch.Tensor, floor: float = 1e-6) -> RowColWeights:
    """D_row, D_col from F, floored at `floor` x their mean so no row or column
    gets weight 0 (which would make the unscale step divide by zero)."""
    f = fisher.to(torch.float32)
    row, col = f.mean(dim=1).sqrt(), f.mean(dim=0).sqrt()
    row = row.clamp_min(floor * float(row.mean()))
    col = col.clamp_min(floor * float(col.mean()))
    return RowColWeights(row, col)


def residual_error(residual: torch.Tensor, fisher: torch.Tensor | None = None) -> float:
    """Squared (Fisher-weighted) Frobenius norm: sum F * R^2, or sum R^2 without F."""
    sq = residual.to(torch.float32).square()
    return float((sq * fisher).sum() if fisher is not None else sq.sum())
