"""Error-table rows without a low-rank part: the batched pricing of QLoRA's init
against one quantize-dequantize per config."""

import pytest
import torch

from lqlora_dagster.decompose.fisher_weights import residual_error
from lqlora_dagster.decompose.inits import ZeroInit
from lqlora_dagster.decompose.lq import LQSettings
from lqlora_dagster.quant.batched_error import quantization_errors
from lqlora_dagster.quant.codec import simulate
from lqlora_dagster.quant.config import CONFIG_GRID, QLORA_NF3


@pytest.fixture()
def sample_configs():
    grid = list(CONFIG_GRID)
    return tuple(grid[::17]) + (QLORA_NF3,)  # every (b, B0) family is hit, plus QLoRA's NF3


@pytest.mark.parametrize("weighted", [False, True])
def test_zero_init_errors_match_one_quantization_per_config(gaussian, sample_configs, weighted):
    F = torch.rand(gaussian.shape, generator=torch.Generator().manual_seed(1)) if weighted else None
    init = ZeroInit("zero", fisher=weighted)  # a Fisher-weighted zero init prices by F
    rows = init.exact_errors(gaussian, sample_configs, LQSettings(rank=4), F)
    assert [r.config for r in rows] == list(sample_configs)  # the order asked for
    for r in rows:
        expected = residual_error(gaussian - simulate(gaussian, r.config), F)
        assert r.error == pytest.approx(expected, rel=1e-3), r.config.name
        assert r.iters == 0


def test_more_bits_never_cost_accuracy(gaussian):
    by_b = {c.b: c for c in CONFIG_GRID if c.B0 == 64 and c.b0 == 8 and c.b1 == "fp32" and c.B1 == 256}
    assert len(by_b) >= 3
    rows = ZeroInit("zero").exact_errors(gaussian, tuple(by_b[b] for b in sorted(by_b)), LQSettings(rank=4))
    errors = [e.error for e in rows]
    assert errors == sorted(errors, reverse=True) and errors[-1] > 0


def test_batched_pricing_needs_one_family():
    a = next(c for c in CONFIG_GRID if c.b == 3)
    b = next(c for c in CONFIG_GRID if c.b == 4)
    with pytest.raises(ValueError, match="share b and B0"):
        quantization_errors(torch.randn(8, 64), [a, b])
