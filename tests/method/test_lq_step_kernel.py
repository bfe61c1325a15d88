"""The compiled LQ steps (kernels/lq_step.cpp) compute exactly what the pure-torch path
computes, so error tables, plans and decompositions do not depend on which one ran.

Every config of the grid and blocks that do not divide the matrix, then whole
decompositions with and without the kernel. These fail, not skip, when the extension
cannot be built: CI has a compiler, and a silently slow table is a defect there."""

import pytest
import torch

from lqlora_dagster.decompose import lq as lq_module
from lqlora_dagster.decompose.inits import get_init
from lqlora_dagster.decompose.lq import LQSettings, loftq_decompose, lq_decompose, lq_error_estimate, prepare
from lqlora_dagster.error_estimation.estimates import estimated_errors
from lqlora_dagster.quant import lut
from lqlora_dagster.quant.batched_error import quantization_errors
from lqlora_dagster.quant.config import CONFIG_GRID, QuantConfig
from lqlora_dagster.quant.lut import RepeatedQuantizer

ODD_BLOCKS = [QuantConfig(3, 3, "fp16", 12, 5), QuantConfig(4, 2, "bf16", 7, 3), QuantConfig(2, 8, "fp32", 20, 1)]


@pytest.fixture()
def pure_torch(monkeypatch):
    """Run the block: with the compiled steps switched off (the GPU's and no-compiler path)."""

    def switch_off():
        monkeypatch.setattr(lut, "_native", lambda: None)

    return switch_off


def matrix(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)  # rows of different scales
    W[0, :5] = 0.0  # exact zeros, and a block whose scale may quantize to 0
    return W


def test_extension_builds_here():
    assert lut.native_steps(torch.device("cpu")) is not None


@pytest.mark.parametrize("shape", [(48, 64), (37, 29)])
def test_quantizer_bit_identical_for_every_config(shape, monkeypatch):
    W = matrix(*shape, seed=shape[0])
    native = {c.name: RepeatedQuantizer(shape, c, W.device)(W).clone() for c in (*CONFIG_GRID, *ODD_BLOCKS)}
    monkeypatch.setattr(lut, "_native", lambda: None)
    mismatched = [
        c.name for c in (*CONFIG_GRID, *ODD_BLOCKS)
        if not torch.equal(native[c.name].view(torch.int32), RepeatedQuantizer(shape, c, W.device)(W).view(torch.int32))
    ]
    assert mismatched == []


@pytest.mark.parametrize("weighted", [False, True])
def test_batched_errors_bit_identical(weighted, pure_torch):
    W = matrix(37, 29, seed=3)
    F = torch.rand(37, 29, generator=torch.Generator().manual_seed(4)) if weighted else None
    groups = {}
    for c in (*CONFIG_GRID, *ODD_BLOCKS):
        groups.setdefault((c.b, c.B0), []).append(c)
    native = [quantization_errors(W, g, F) for g in groups.values()]
    pure_torch()
    assert [quantization_errors(W, g, F) for g in groups.values()] == native


def test_decompositions_bit_identical_with_and_without_the_kernel(smollm2, pure_torch):
    """Whole LQ runs on a real matrix: the same trace, factors and codes either way."""
    W = smollm2[0].model.layers[3].self_attn.k_proj.weight.detach()
    F = torch.rand(W.shape, generator=torch.Generator().manual_seed(0)) ** 2
    s = LQSettings(rank=8, max_iters=12)
    configs = [CONFIG_GRID[5], CONFIG_GRID[250], ODD_BLOCKS[0]]

    def runs():
        out = []
        for c in configs:
            d = lq_decompose(W, c, s, F)
            out.append((d.trace, d.L1, d.L2, d.reconstruct()))
            out.append((lq_error_estimate(W, c, s).trace,))
        lf = loftq_decompose(W, configs[1], s, iters=3)
        out.append((lf.trace, lf.reconstruct()))
        out.append(tuple(e.error for e in estimated_errors(W, tuple(CONFIG_GRID[::9]), s, F)))
        return out

    native = runs()
    pure_torch()
    for a, b in zip(native, runs(), strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_shared_first_fit_gives_each_config_its_own_cold_start():
    """Configs of one prepared matrix share the first fit; every result equals a fresh run."""
    W = matrix(48, 64, seed=7)
    F = torch.rand(48, 64, generator=torch.Generator().manual_seed(8))
    init = get_init("lq-fisher")
    configs = (CONFIG_GRID[10], CONFIG_GRID[100], CONFIG_GRID[300])
    for s in (LQSettings(rank=4, max_iters=6), LQSettings(rank=6, max_iters=6, seed=3)):
        together = [e.error for e in init.exact_errors(W, configs, s, F)]
        alone = [lq_error_estimate(W, c, s, F).error for c in configs]
        assert together == alone
    data = prepare(W, F)
    first = [lq_error_estimate(data, c, LQSettings(rank=4, max_iters=6)).error for c in configs]
    other_rank = [lq_error_estimate(data, c, LQSettings(rank=6, max_iters=6)).error for c in configs]
    assert first == [lq_error_estimate(W, c, LQSettings(rank=4, max_iters=6), F).error for c in configs]
    assert other_rank == [lq_error_estimate(W, c, LQSettings(rank=6, max_iters=6), F).error for c in configs]


def test_a_prepared_matrix_refuses_a_second_fisher_diagonal():
    W = matrix(8, 16, seed=1)
    data = prepare(W, torch.rand(8, 16))
    with pytest.raises(ValueError, match="carries its own Fisher"):
        lq_module.lq_error_estimate(data, CONFIG_GRID[0], LQSettings(rank=2), torch.rand(8, 16))
