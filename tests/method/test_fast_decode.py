"""The compiled fast path decodes exactly what the pure-torch rule decodes.

Every config of the grid, on shapes whose rows end mid-block, mid-byte and mid-group,
and the fused multiply against the dense one. These fail, not skip, when the extension
cannot be built: CI has a compiler, and a silently slow product is a defect there."""

import pytest
import torch

from lqlora_dagster.quant import fast_decode
from lqlora_dagster.quant.config import CONFIG_GRID, QuantConfig
from lqlora_dagster.quant.matrix import QuantizedMatrix
from lqlora_dagster.surgery.lq_linear import LQLinear

SHAPES = [(64, 48), (37, 29), (5, 3), (96, 160)]
ODD_BLOCKS = [QuantConfig(3, 3, "fp16", 12, 5), QuantConfig(4, 2, "bf16", 7, 3), QuantConfig(2, 8, "fp32", 20, 1)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_extension_builds_here():
    assert fast_decode.kernel() is not None


@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_bit_identical_for_every_config(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
    W[0, :3] = 0.0  # exact zeros and a zero block scale path
    mismatched = [
        cfg.name for cfg in (*CONFIG_GRID, *ODD_BLOCKS)
        if not same_bits(fast_decode.dequantize(qm := QuantizedMatrix.quantize(W, cfg)), qm.reference_dequantize())
    ]
    assert mismatched == []


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("cfg", [CONFIG_GRID[0], CONFIG_GRID[200], CONFIG_GRID[-1], *ODD_BLOCKS])
def test_fused_matmul_matches_dense(rows, cfg):
    W = torch.randn(37, 88, generator=torch.Generator().manual_seed(1))
    qm = QuantizedMatrix.quantize(W, cfg)
    x = torch.randn(rows, 88, generator=torch.Generator().manual_seed(2))
    fused = fast_decode.matmul(x, qm)
    assert fused is not None and fused.shape == (rows, 37)
    torch.testing.assert_close(fused, x @ qm.reference_dequantize().T, rtol=1e-5, atol=1e-5)


WIDE_ROWS = [c for c in CONFIG_GRID if c.b1 == "bf16" and c.B1 == 64 and c.b0 == 8 and c.B0 in (16, 32, 64)]


@pytest.mark.parametrize("rows", [1, 2, 16])
@pytest.mark.parametrize("cfg", WIDE_ROWS, ids=lambda c: c.name)
def test_fused_matmul_on_whole_block_rows(rows, cfg):
    """Rows of whole blocks of 16+ weights: the 16-lane path on AVX-512 machines, with the
    matrix's last row (whose codes end the buffer) read the careful way."""
    W = torch.randn(40, 128, generator=torch.Generator().manual_seed(3))
    qm = QuantizedMatrix.quantize(W, cfg)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(fast_decode.matmul(x, qm), x @ qm.reference_dequantize().T, rtol=1e-5, atol=1e-5)


def test_fused_matmul_declines_what_it_does_not_cover():
    qm = QuantizedMatrix.quantize(torch.randn(8, 16), CONFIG_GRID[0])
    assert fast_decode.matmul(torch.randn(17, 16), qm) is None  # many rows: decode once, then mm
    assert fast_decode.matmul(torch.randn(2, 16, dtype=torch.float64), qm) is None


def test_lq_linear_same_output_and_grads_on_both_paths(monkeypatch):
    torch.manual_seed(0)
    W = torch.randn(48, 64)
    layer = LQLinear(QuantizedMatrix.quantize(W, CONFIG_GRID[100]), torch.randn(48, 4), torch.randn(4, 64),
                     bias=torch.randn(48))

    def run():
        x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
        y = layer(x)
        y.square().sum().backward()
        grads = (x.grad.clone(), layer.L1.grad.clone(), layer.L2.grad.clone())
        layer.zero_grad()
        return y.detach(), grads

    fast_y, fast_grads = run()
    monkeypatch.setattr(fast_decode, "available", lambda device: False)
    slow_y, slow_grads = run()
    torch.testing.assert_close(fast_y, slow_y, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 5, 40])  # 40 rows: decode once, then mm and in-place low rank
@pytest.mark.parametrize("bias", [True, False])
def test_inference_forward_matches_the_training_forward(rows, bias):
    torch.manual_seed(0)
    layer = LQLinear(QuantizedMatrix.quantize(torch.randn(48, 64), CONFIG_GRID[300]), torch.randn(48, 4),
                     torch.randn(4, 64), bias=torch.randn(48) if bias else None, scaling=0.5)
    x = torch.randn(rows, 64)
    with torch.no_grad():
        fast = layer(x)
    slow = layer(x.requires_grad_()).detach()  # the autograd path: dense decode, separate ops
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
