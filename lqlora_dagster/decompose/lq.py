"""LQ decomposition W ~ Q + L1 @ L2 by alternating low-rank SVD and quantization.

One loop serves three methods: LQ-LoRA (SVD first, keep the best iterate, stop when
the error stops falling), its Fisher-weighted variant (weighted SVD and error), and
LoftQ (quantize first, a fixed number of iterations, keep the last).
"""

from dataclasses import dataclass, field
from typing import Literal

import torch

from lqlora_dagster.decompose.fisher_weights import (
    check_fisher,
    residual_error,
    row_col_weights,
)
from lqlora_dagster.decompose.lowrank import SVD_METHODS, LowRank, full_low_rank, randomized_low_rank
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.knobs import check_knobs, knob
from lqlora_dagster.quant.codec import Codes, decode, encode
from lqlora_dagster.quant.config import QuantConfig
from lqlora_dagster.quant.lut import RepeatedQuantizer
from lqlora_dagster.quant.matrix import QuantizedMatrix
from lqlora_dagster.validation import check_matrix, check_rank


@dataclass(frozen=True)
class LQSettings:
    """Knobs of the alternating decomposition (each a launchpad field and a CLI flag)."""

    rank: int = knob(
        16,
        "rank r of the low-rank factors L1 (m x r), L2 (r x n); the paper used 64 at 7B, where it "
        "costs ~0.5 bits/param; on 576-wide matrices 16 costs 0.74",
        ge=1,
    )
    svd: str = knob(
        "randomized", "how each iteration fits L1 L2: randomized (torch.svd_lowrank) or full", choices=SVD_METHODS
    )
    max_iters: int = knob(100, "cap on LQ iterations per matrix", ge=1)
    rel_tol: float = knob(
        1e-3,
        "stop once an iteration improves the best error by less than this fraction (0: at the first "
        "iteration that does not improve at all)",
        ge=0,
        lt=1,
    )
    oversample: int = knob(10, "randomized SVD: columns sampled beyond the rank", ge=0)
    power_iters: int = knob(1, "randomized SVD: power iterations per fit (the basis is warm-started)", ge=0)
    seed: int = knob(0, "seed of the randomized SVD", flags=("--svd-seed",))

    def __post_init__(self) -> None:
        check_knobs(self)


@dataclass(frozen=True)
class Decomposition:
    """Best iterate of a decomposition: W ~ decode(codes) + L1 @ L2.

    `codes` is None for error estimates (`lq_error_estimate`)."""

    codes: Codes | None
    L1: torch.Tensor  # (m, r)
    L2: torch.Tensor  # (r, n)
    # squared (Fisher-weighted if given) Frobenius norm of the residual, as the loop
    # measured it (table-based Q: within ~1e-6 of the packed Q's)
    error: float
    trace: tuple[float, ...] = field(default=())  # error after each iteration
    best_iter: int = 0

    def quantized(self) -> QuantizedMatrix:
        if self.codes is None:
            raise ValueError("this decomposition was an error estimate (fast quantizer); it holds no codes")
        return QuantizedMatrix.from_codes(self.codes)

    def reconstruct(self) -> torch.Tensor:
        return decode(self.codes) + self.L1 @ self.L2


class _LowRankStep:
    """Rank-r fit of a residual, optionally in Fisher-scaled coordinates, warm-started."""

    def __init__(self, settings: LQSettings, fisher: torch.Tensor | None, device: torch.device):
        self.s = settings
        self.weights = row_col_weights(fisher) if fisher is not None else None
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.basis: torch.Tensor | None = None

    def __call__(self, R: torch.Tensor) -> LowRank:
        A = self.weights.scale(R) if self.weights is not None else R
        if self.s.svd == "full":
            fit = full_low_rank(A, self.s.rank)
        else:
            fit, self.basis = randomized_low_rank(
                A,
                self.s.rank,
                oversample=self.s.oversample,
                power_iters=self.s.power_iters,
                generator=self.generator,
                start=self.basis,
            )
        if self.weights is None:
            return fit
        return LowRank(*self.weights.unscale(fit.L1, fit.L2))


def _alternate(
    W: torch.Tensor,
    config: QuantConfig,
    settings: LQSettings,
    fisher: torch.Tensor | None,
    order: Literal["svd_first", "quantize_first"],
    fixed_iters: int | None,
    start: LowRank | None = None,
    with_codes: bool = True,
) -> Decomposition:
    """The loop, quantizing by table (`quant/lut.py`) at every step; the chosen iterate's
    input is encoded once at the end. So the stored decomposition follows exactly the
    trajectory the error table priced: same iterate, same error (to ~1e-6 of the
    residual of the packed Q), whether asked for codes or only for the error."""
    quantize = RepeatedQuantizer(tuple(W.shape), config, W.device)
    step = _LowRankStep(settings, fisher, W.device)
    trace: list[float] = []
    best: Decomposition | None = None
    last: Decomposition | None = None
    best_input = last_input = None  # the residual quantized into the best / last iterate's Q
    Q = torch.zeros_like(W)
    LR = torch.zeros_like(W)
    R = torch.empty_like(W)  # scratch: residuals are formed here, not in fresh tensors

    def error_of(Q: torch.Tensor, LR: torch.Tensor) -> float:
        torch.sub(W, Q, out=R)
        R.sub_(LR).square_()
        return float(torch.dot(R.view(-1), fisher.view(-1)) if fisher is not None else R.sum())

    if start is not None:  # warm start: Q <- q(W - L1 L2) for the given factors, then alternate
        LR = start.product()
        quantized = torch.sub(W, LR)
        Q = quantize(quantized)
        err = error_of(Q, LR)
        trace.append(err)
        best = last = Decomposition(None, start.L1, start.L2, err, best_iter=0)
        best_input = last_input = quantized
    n_iters = fixed_iters if fixed_iters is not None else settings.max_iters
    for _ in range(n_iters):
        if order == "svd_first":  # L <- SVD(W - Q); Q <- q(W - L)
            fit = step(torch.sub(W, Q, out=R))
            LR = fit.product()
            quantized = torch.sub(W, LR)
            Q = quantize(quantized)
        else:  # Q <- q(W - L); L <- SVD(W - Q)
            quantized = torch.sub(W, LR)
            Q = quantize(quantized)
            fit = step(torch.sub(W, Q, out=R))
            LR = fit.product()
        err = error_of(Q, LR)
        trace.append(err)
        last, last_input = Decomposition(None, fit.L1, fit.L2, err, best_iter=len(trace) - 1), quantized
        improved = best is None or err < best.error * (1 - settings.rel_tol)
        if best is None or err < best.error:
            best, best_input = last, quantized
        if fixed_iters is None and not improved:
            break
    chosen, chosen_input = (last, last_input) if fixed_iters is not None else (best, best_input)
    assert chosen is not None and chosen_input is not None
    codes = encode(chosen_input, config) if with_codes else None
    return Decomposition(codes, chosen.L1, chosen.L2, chosen.error, tuple(trace), chosen.best_iter)


def _checked(
    W: torch.Tensor, settings: LQSettings, fisher: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W and F validated, as fp32 on W's device."""
    check_matrix(W)
    check_rank(settings.rank, tuple(W.shape))
    if fisher is not None:
        check_fisher(fisher, tuple(W.shape))
    W = W.detach().to(torch.float32)
    return W, fisher.to(W.device, torch.float32) if fisher is not None else None


def lq_decompose(
    W: torch.Tensor,
    config: QuantConfig,
    settings: LQSettings = LQSettings(),
    fisher: torch.Tensor | None = None,
    start: LowRank | None = None,
) -> Decomposition:
    """LQ-LoRA: Q <- 0; repeat L <- SVD_r(W - Q), Q <- quantize(W - L); keep the best.

    With `fisher` (same shape as W) the SVD runs on the row/column-scaled residual and
    the error is sum F * (W - Q - L1 L2)^2. With `start` (factors from a neighbouring
    config) the loop begins at Q <- quantize(W - start) instead of Q <- 0.
    """
    W, f = _checked(W, settings, fisher)
    return _alternate(W, config, settings, f, "svd_first", fixed_iters=None, start=start)


def lq_error_estimate(
    W: torch.Tensor,
    config: QuantConfig,
    settings: LQSettings = LQSettings(),
    fisher: torch.Tensor | None = None,
    start: LowRank | None = None,
) -> Decomposition:
    """`lq_decompose` without the final encoding: the same iterates and the same error,
    bit for bit, but no codes (for error tables, not for storing)."""
    W, f = _checked(W, settings, fisher)
    return _alternate(W, config, settings, f, "svd_first", fixed_iters=None, start=start, with_codes=False)


def lq_error_trace(
    W: torch.Tensor,
    config: QuantConfig,
    iters: int,
    settings: LQSettings = LQSettings(),
    fisher: torch.Tensor | None = None,
) -> tuple[float, ...]:
    """The error after each of `iters` LQ-LoRA iterations from a cold start, with no
    early stop: how the loop converges, and what its stopping rule gives away
    (bench/bench_lq_convergence.py). The first entries equal `lq_error_estimate`'s trace."""
    if iters < 1:
        raise LQLoRAInputError(f"iters must be >= 1, got {iters}")
    W, f = _checked(W, settings, fisher)
    return _alternate(W, config, settings, f, "svd_first", fixed_iters=iters, with_codes=False).trace


def loftq_decompose(
    W: torch.Tensor, config: QuantConfig, settings: LQSettings = LQSettings(), iters: int = 5
) -> Decomposition:
    """LoftQ: Q <- quantize(W); L <- SVD_r(W - Q); then `iters - 1` more alternations,
    keeping the last iterate (no early stop), as in Li et al. 2023, Algorithm 1."""
    if iters < 1:
        raise LQLoRAInputError(f"LoftQ needs at least 1 iteration, got {iters}")
    W, _ = _checked(W, settings, None)
    return _alternate(W, config, settings, None, "quantize_first", fixed_iters=iters)


def quantize_only(W: torch.Tensor, config: QuantConfig, fisher: torch.Tensor | None = None) -> Decomposition:
    """Rank 0: Q = quantize(W) and no low-rank part (empty L1, L2); the error is Fisher-
    weighted when F is given, as a rank-0 row of an LQ-Fisher table is."""
    check_matrix(W)
    if fisher is not None:
        check_fisher(fisher, tuple(W.shape))
        fisher = fisher.to(W.device, torch.float32)
    W = W.detach().to(torch.float32)
    m, n = W.shape
    codes = encode(W, config)
    err = residual_error(W - decode(codes), fisher)
    return Decomposition(codes, W.new_zeros(m, 0), W.new_zeros(0, n), err, (err,), 0)


def qlora_init(W: torch.Tensor, config: QuantConfig, rank: int, seed: int = 0) -> Decomposition:
    """QLoRA: Q <- quantize(W) and LoRA's default init, L1 = 0 and L2 ~ U(+-1/sqrt(n))
    (PEFT's kaiming-uniform lora_A), so Q + L1 L2 = Q at step 0."""
    W, _ = _checked(W, LQSettings(rank=rank), None)
    m, n = W.shape
    codes = encode(W, config)
    g = torch.Generator().manual_seed(seed)
    L2 = (torch.rand(rank, n, generator=g) * 2 - 1) / n**0.5
    err = residual_error(W - decode(codes))
    return Decomposition(codes, torch.zeros(m, rank, device=W.device), L2.to(W.device), err, (err,), 0)
