"""LQ decomposition, its Fisher variant, LoftQ and QLoRA init on synthetic matrices."""

import pytest
import torch

from lqlora_dagster.decompose.fisher_weights import residual_error
from lqlora_dagster.decompose.lowrank import full_low_rank, low_rank
from lqlora_dagster.decompose.lq import (
    LQSettings,
    loftq_decompose,
    lq_decompose,
    lq_error_estimate,
    lq_error_trace,
    qlora_init,
)
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.quant import QLORA_NF3, simulate


@pytest.fixture()
def low_rank_plus_noise() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(128, 8, generator=g) @ torch.randn(8, 96, generator=g) * 0.1
        + torch.randn(128, 96, generator=g) * 0.02
    )


def test_randomized_svd_matches_full_on_low_rank_input(low_rank_plus_noise):
    A = low_rank_plus_noise
    full = full_low_rank(A, 8).product()
    rand = low_rank(A, 8, generator=torch.Generator().manual_seed(1)).product()
    assert torch.allclose(full, rand, atol=1e-3)


def test_factors_split_the_singular_values(low_rank_plus_noise):
    f = full_low_rank(low_rank_plus_noise, 4)
    assert f.L1.shape == (128, 4) and f.L2.shape == (4, 96)
    # L1 = U sqrt(S), L2 = sqrt(S) V^T: column norms of L1 equal row norms of L2
    assert torch.allclose(f.L1.norm(dim=0), f.L2.norm(dim=1), rtol=1e-4)


@pytest.mark.parametrize("svd", ["randomized", "full"])
def test_lq_beats_plain_quantization(low_rank_plus_noise, svd):
    W = low_rank_plus_noise
    plain = residual_error(W - simulate(W, QLORA_NF3))
    d = lq_decompose(W, QLORA_NF3, LQSettings(rank=8, svd=svd))
    assert d.error < 0.5 * plain
    assert d.error == pytest.approx(residual_error(W - d.reconstruct()), rel=1e-5)
    assert d.L1.shape == (128, 8) and d.L2.shape == (8, 96)


def test_keeps_best_iterate_and_stops_when_error_stops_falling(low_rank_plus_noise):
    d = lq_decompose(low_rank_plus_noise, QLORA_NF3, LQSettings(rank=8, rel_tol=0.0, max_iters=100))
    assert d.error == min(d.trace) == d.trace[d.best_iter]
    assert len(d.trace) < 100  # stopped on its own
    assert d.trace[-1] >= min(d.trace[:-1])  # the last iteration did not improve


def test_error_trace_runs_on_past_the_stopping_rule(low_rank_plus_noise):
    s = LQSettings(rank=8, rel_tol=0.0)
    stopped = lq_error_estimate(low_rank_plus_noise, QLORA_NF3, s)
    trace = lq_error_trace(low_rank_plus_noise, QLORA_NF3, len(stopped.trace) + 5, s)
    assert len(trace) == len(stopped.trace) + 5
    assert trace[: len(stopped.trace)] == stopped.trace  # the same iterates, bit for bit
    with pytest.raises(LQLoRAInputError, match="iters must be >= 1"):
        lq_error_trace(low_rank_plus_noise, QLORA_NF3, 0, s)


def test_iteration_cap(low_rank_plus_noise):
    d = lq_decompose(low_rank_plus_noise, QLORA_NF3, LQSettings(rank=8, rel_tol=0.0, max_iters=2))
    assert len(d.trace) <= 2


def test_packed_q_matches_decomposition(low_rank_plus_noise):
    d = lq_decompose(low_rank_plus_noise, QLORA_NF3, LQSettings(rank=8))
    q = d.quantized()
    assert torch.equal(q.dequantize() + d.L1 @ d.L2, d.reconstruct())


def test_fisher_variant_lowers_weighted_error():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(64, 80, generator=g) * 0.05
    # a few rows and columns matter far more than the rest
    F = torch.ones(64, 80) * 1e-3
    F[:6] = 1.0
    F[:, :5] = 1.0
    plain = lq_decompose(W, QLORA_NF3, LQSettings(rank=8))
    weighted = lq_decompose(W, QLORA_NF3, LQSettings(rank=8), fisher=F)
    assert weighted.error < residual_error(W - plain.reconstruct(), F)
    assert weighted.error == pytest.approx(residual_error(W - weighted.reconstruct(), F), rel=1e-5)


def test_deterministic_for_a_seed(low_rank_plus_noise):
    a = lq_decompose(low_rank_plus_noise, QLORA_NF3, LQSettings(rank=8, seed=5))
    b = lq_decompose(low_rank_plus_noise, QLORA_NF3, LQSettings(rank=8, seed=5))
    assert a.trace == b.trace and torch.equal(a.L1, b.L1)


def test_loftq_runs_fixed_iterations_and_keeps_last(low_rank_plus_noise):
    d = loftq_decompose(low_rank_plus_noise, QLORA_NF3, LQSettings(rank=8), iters=4)
    assert len(d.trace) == 4 and d.best_iter == 3 and d.error == d.trace[-1]
    # its first iterate is plain quantization of W followed by SVD of the residual
    one = loftq_decompose(low_rank_plus_noise, QLORA_NF3, LQSettings(rank=8, svd="full"), iters=1)
    assert torch.equal(one.codes.codes, simulate_codes(low_rank_plus_noise))


def simulate_codes(W):
    from lqlora_dagster.quant.codec import encode

    return encode(W, QLORA_NF3).codes


def test_qlora_init_is_quantization_with_zero_product(low_rank_plus_noise):
    W = low_rank_plus_noise
    d = qlora_init(W, QLORA_NF3, rank=8)
    assert torch.equal(d.L1, torch.zeros(128, 8)) and d.L2.abs().max() <= 96**-0.5
    assert d.L2.abs().sum() > 0  # L2 is random so gradients reach L1
    assert torch.equal(d.reconstruct(), simulate(W, QLORA_NF3))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(W=torch.randn(3, 4, 5)), "must be a 2-D matrix"),
        (dict(W=torch.full((8, 8), float("nan"))), "64 NaN"),
        (dict(settings=LQSettings(rank=32)), "rank 32 is out of range for a 32x40 matrix"),
        (dict(fisher=torch.ones(3, 3)), "Fisher diagonal must have the weight's shape"),
        (dict(fisher=-torch.ones(32, 40)), "finite and >= 0"),
        (dict(fisher=torch.zeros(32, 40)), "all zero"),
    ],
)
def test_bad_input(kwargs, message):
    args = dict(W=torch.randn(32, 40), config=QLORA_NF3, settings=LQSettings(rank=4), fisher=None)
    args.update(kwargs)
    with pytest.raises(LQLoRAInputError, match=message):
        lq_decompose(**args)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(svd="lanczos"), "unknown svd 'lanczos'; choose from randomized, full"),
        (dict(rank=0), "rank must be an integer >= 1, got 0"),
        (dict(max_iters=0), "max_iters"),
        (dict(rel_tol=1.0), "rel_tol"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(LQLoRAInputError, match=message):
        LQSettings(**kwargs)
