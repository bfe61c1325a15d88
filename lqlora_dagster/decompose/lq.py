"""LQ decomposition W ~ Q + L1 @ L2 by alternating low-rank SVD and quantization.

One loop serves three methods: LQ-LoRA (SVD first, keep the best iterate, stop when
the error stops falling), its Fisher-weighted variant (weighted SVD and error), and
LoftQ (quantize first, a fixed number of iterations, keep the last).
"""

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Literal

import torch

from lqlora_dagster.decompose.fisher_weights import (
    RowColWeights,
    check_fisher,
    residual_error,
    row_col_weights,
)
from lqlora_dagster.decompose.lowrank import SVD_METHODS, LowRank, full_low_rank, randomized_low_rank
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.knobs import check_knobs, knob
from lqlora_dagster.quant.codec import Codes, decode, encode
from lqlora_dagster.quant.config import QuantConfig
from lqlora_dagster.quant.lut import RepeatedQuantizer, native_steps
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
    power_iters: int = knob(1, "randomized SVD: power iterations of each of a decomposition's first fits", ge=0)
    power_fits: int = knob(
        3,
        "randomized SVD: how many fits of a decomposition take `power_iters` power iterations; later "
        "fits start from the previous iteration's basis, which the alternation itself has refined, and take none",
        ge=1,
    )
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


@dataclass
class LQInput:
    """A matrix (and its Fisher diagonal) validated once, as contiguous fp32 on W's device,
    for every decomposition of it: an error table runs dozens. A cold start's first fit
    (of W itself) depends only on the matrix and the fit's settings, so it is computed
    once here and shared by every config (the same bits as computing it each time)."""

    W: torch.Tensor
    fisher: torch.Tensor | None
    weights: RowColWeights | None = None
    _first_fits: dict = field(default_factory=dict)

    def first_fit(self, settings: LQSettings, compute: Callable[[], tuple[LowRank, torch.Tensor | None]]):
        key = (settings.rank, settings.svd, settings.oversample, settings.power_iters, settings.seed)
        if key not in self._first_fits:
            self._first_fits[key] = compute()
        return self._first_fits[key]


def prepare(W: "torch.Tensor | LQInput", fisher: torch.Tensor | None = None) -> LQInput:
    """`W` and `fisher` checked and converted once (an LQInput is returned as it is)."""
    if isinstance(W, LQInput):
        if fisher is not None:
            raise ValueError("an LQInput carries its own Fisher diagonal; pass fisher=None with it")
        return W
    check_matrix(W)
    if fisher is not None:
        check_fisher(fisher, tuple(W.shape))
    W = W.detach().to(torch.float32).contiguous()
    f = fisher.to(W.device, torch.float32).contiguous() if fisher is not None else None
    return LQInput(W, f, row_col_weights(f) if f is not None else None)


class InputCache:
    """Prepared inputs kept for matrices decomposed again later: plan confirmation asks
    for a few more configs of the same matrices round after round, and each round would
    otherwise read the matrix and its Fisher diagonal again, check them again and redo
    the cold start's first fit (the same bits each time). Holds at most `max_bytes` of
    matrices; the least recently used go first. Thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._held: dict[Hashable, tuple[LQInput, int]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], LQInput]) -> LQInput:
        with self._lock:
            if key in self._held:
                self._held[key] = self._held.pop(key)  # most recently used last
                return self._held[key][0]
        data = make()
        size = sum(t.numel() * t.element_size() for t in (data.W, data.fisher) if t is not None)
        with self._lock:
            if key not in self._held and size <= self.max_bytes:
                while self._held and self._bytes + size > self.max_bytes:
                    self._bytes -= self._held.pop(next(iter(self._held)))[1]
                self._held[key] = (data, size)
                self._bytes += size
        return data


class _LowRankStep:
    """Rank-r fit of the residual W - Q, optionally in Fisher-scaled coordinates, warm-started."""

    def __init__(self, data: LQInput, settings: LQSettings):
        self.s, self.W, self.data = settings, data.W, data
        self.weights = data.weights
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.basis: torch.Tensor | None = None
        self.fits = 0  # fits made so far (the shared first fit counts)
        self.native = native_steps(self.W.device)
        self._A = torch.empty_like(self.W)  # the (scaled) residual is formed here each step

    def first(self) -> LowRank:
        """The fit of W - 0, a cold start's first step: shared by every config of the matrix."""
        fit, self.basis = self.data.first_fit(self.s, lambda: (self(torch.zeros_like(self.W)), self.basis))
        self.fits = 1
        return fit

    def _residual(self, Q: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            row, col = (self.weights.row, self.weights.col) if self.weights is not None else (_NONE, _NONE)
            self.native.scaled_difference(self.W, Q, row, col, self._A)
            return self._A
        R = torch.sub(self.W, Q, out=self._A)
        return self.weights.scale(R) if self.weights is not None else R

    def __call__(self, Q: torch.Tensor) -> LowRank:
        """Once the residual barely moves between iterations, a fit started from the previous
        basis needs no power iteration of its own: the alternation runs one per iteration
        (bench/bench_warm_power.py: rows within their seed noise, ~25% less CPU)."""
        A = self._residual(Q)
        self.fits += 1
        if self.s.svd == "full":
            fit = full_low_rank(A, self.s.rank)
        else:
            fit, self.basis = randomized_low_rank(
                A,
                self.s.rank,
                oversample=self.s.oversample,
                power_iters=self.s.power_iters if self.basis is None or self.fits <= self.s.power_fits else 0,
                generator=self.generator,
                start=self.basis,
            )
        if self.weights is None:
            return fit
        return LowRank(*self.weights.unscale(fit.L1, fit.L2))


_NONE = torch.empty(0)


def _alternate(
    data: LQInput,
    config: QuantConfig,
    settings: LQSettings,
    order: Literal["svd_first", "quantize_first"],
    fixed_iters: int | None,
    start: LowRank | None = None,
    with_codes: bool = True,
) -> Decomposition:
    """The loop, quantizing by table (`quant/lut.py`) at every step; the chosen iterate's
    input is encoded once at the end. So the stored decomposition follows exactly the
    trajectory the error table priced: same iterate, same error (to ~1e-6 of the
    residual of the packed Q), whether asked for codes or only for the error.

    Every m x n intermediate lives in a buffer allocated once (fresh ones cost page
    faults that, at these sizes, took as long as the arithmetic)."""
    W, fisher = data.W, data.fisher
    check_rank(settings.rank, tuple(W.shape))
    quantize = RepeatedQuantizer(tuple(W.shape), config, W.device)
    step = _LowRankStep(data, settings)
    native = native_steps(W.device)
    trace: list[float] = []
    best: Decomposition | None = None
    last: Decomposition | None = None
    keep_last = fixed_iters is not None  # which iterate's quantizer input the codes need
    # quantizer inputs: one holds the kept iterate's (when codes are wanted), one is scratch
    inputs = [torch.empty_like(W), torch.empty_like(W) if with_codes else None]
    kept: torch.Tensor | None = None
    Q = torch.zeros_like(W)
    LR = torch.zeros_like(W)
    R = torch.empty_like(W)  # scratch for the error

    def error_of(Q: torch.Tensor, LR: torch.Tensor) -> float:
        if native is not None:
            native.squared_residual(W, Q, LR, R)
        else:
            torch.sub(W, Q, out=R)
            R.sub_(LR).square_()
        return float(torch.dot(R.view(-1), fisher.view(-1)) if fisher is not None else R.sum())

    def quantized_input() -> torch.Tensor:
        return inputs[1] if with_codes and inputs[0] is kept else inputs[0]

    if start is not None:  # warm start: Q <- q(W - L1 L2) for the given factors, then alternate
        torch.mm(start.L1, start.L2, out=LR)
        kept = quantized_input()
        Q = quantize.difference(W, LR, kept)
        err = error_of(Q, LR)
        trace.append(err)
        best = last = Decomposition(None, start.L1, start.L2, err, best_iter=0)
    n_iters = fixed_iters if fixed_iters is not None else settings.max_iters
    for _ in range(n_iters):
        X = quantized_input()
        if order == "svd_first":  # L <- SVD(W - Q); Q <- q(W - L)
            fit = step.first() if start is None and not trace else step(Q)
            torch.mm(fit.L1, fit.L2, out=LR)
            Q = quantize.difference(W, LR, X)
        else:  # Q <- q(W - L); L <- SVD(W - Q)
            Q = quantize.difference(W, LR, X)
            fit = step(Q)
            torch.mm(fit.L1, fit.L2, out=LR)
        err = error_of(Q, LR)
        trace.append(err)
        last = Decomposition(None, fit.L1, fit.L2, err, best_iter=len(trace) - 1)
        improved = best is None or err < best.error * (1 - settings.rel_tol)
        if best is None or err < best.error:
            best = last
            if not keep_last:
                kept = X
        if keep_last:
            kept = X
        if fixed_iters is None and not improved:
            break
    chosen = last if keep_last else best
    assert chosen is not None and kept is not None
    codes = encode(kept, config) if with_codes else None
    return Decomposition(codes, chosen.L1, chosen.L2, chosen.error, tuple(trace), chosen.best_iter)


def lq_decompose(
    W: "torch.Tensor | LQInput",
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
    return _alternate(prepare(W, fisher), config, settings, "svd_first", fixed_iters=None, start=start)


def lq_error_estimate(
    W: "torch.Tensor | LQInput",
    config: QuantConfig,
    settings: LQSettings = LQSettings(),
    fisher: torch.Tensor | None = None,
    start: LowRank | None = None,
) -> Decomposition:
    """`lq_decompose` without the final encoding: the same iterates and the same error,
    bit for bit, but no codes (for error tables, not for storing)."""
    return _alternate(prepare(W, fisher), config, settings, "svd_first", fixed_iters=None, start=start, with_codes=False)


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
    return _alternate(prepare(W, fisher), config, settings, "svd_first", fixed_iters=iters, with_codes=False).trace


def loftq_decompose(
    W: torch.Tensor, config: QuantConfig, settings: LQSettings = LQSettings(), iters: int = 5
) -> Decomposition:
    """LoftQ: Q <- quantize(W); L <- SVD_r(W - Q); then `iters - 1` more alternations,
    keeping the last iterate (no early stop), as in Li et al. 2023, Algorithm 1."""
    if iters < 1:
        raise LQLoRAInputError(f"LoftQ needs at least 1 iteration, got {iters}")
    return _alternate(prepare(W), config, settings, "quantize_first", fixed_iters=iters)


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
    settings = LQSettings(rank=rank)
    W = prepare(W).W
    check_rank(settings.rank, tuple(W.shape))
    m, n = W.shape
    codes = encode(W, config)
    g = torch.Generator().manual_seed(seed)
    L2 = (torch.rand(rank, n, generator=g) * 2 - 1) / n**0.5
    err = residual_error(W - decode(codes))
    return Decomposition(codes, torch.zeros(m, rank, device=W.device), L2.to(W.device), err, (err,), 0)
