"""Packed quantization: exact round trip, byte accounting, any shape, safetensors."""

import itertools

import pytest
import torch

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.quant import CONFIG_GRID, QLORA_NF3, QLORA_NF4, QuantConfig, QuantizedMatrix, simulate
from lqlora_dagster.quant.config import storage_bits
from lqlora_dagster.quant.normal_float import nf_codebook

SHAPES = [(64, 64), (192, 576), (7, 13), (1, 1), (33, 100)]
CONFIGS = [QLORA_NF4, QLORA_NF3, QuantConfig(2, 2, "bf16", 16, 16), QuantConfig(8, 3, "fp16", 32, 64)]


def test_grid_and_qlora_cost():
    assert len(CONFIG_GRID) == 432 == len(set(CONFIG_GRID))
    assert round(QLORA_NF4.bits_per_param, 3) == 4.127
    assert QLORA_NF4.bits_per_param == 4 + 8 / 64 + 32 / (64 * 256)
    assert (
        QuantConfig(4, 8, "bf16", 64, 256).bits_per_param == QuantConfig(4, 8, "fp16", 64, 256).bits_per_param
    )


@pytest.mark.parametrize("shape,config", list(itertools.product(SHAPES, CONFIGS)))
def test_round_trip_is_exact_and_bytes_match_formula(shape, config):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 0.05
    qm = QuantizedMatrix.quantize(W, config)
    assert torch.equal(qm.dequantize(), simulate(W, config))
    assert qm.nbytes == qm.expected_nbytes()
    # the plan's accounting (padding and the 32-bit header counted) is the packed bytes exactly
    assert qm.nbytes * 8 == storage_bits(W.numel(), config)


def test_bits_per_param_equals_formula_when_shapes_divide():
    W = torch.randn(256, 256)  # 65536 = 64 * 256 * 4: no padding
    qm = QuantizedMatrix.quantize(W, QLORA_NF4)
    assert qm.nbytes * 8 - 32 == QLORA_NF4.bits_per_param * W.numel()


def test_padding_is_counted_for_odd_shapes():
    W = torch.randn(192, 576)  # 1728 blocks of 64 is 6.75 groups of 256
    qm = QuantizedMatrix.quantize(W, QLORA_NF4)
    assert qm.bits_per_param > QLORA_NF4.bits_per_param
    assert storage_bits(W.numel(), QLORA_NF4) == 1728 * 64 * 4 + 7 * 256 * 8 + 7 * 32 + 32


def test_codes_are_the_nearest_levels_for_the_stored_scales(gaussian):
    # Direct computation: per block, the nearest of the NF levels times the block's scale.
    config = QuantConfig(3, 8, "fp32", 32, 16)
    qm = QuantizedMatrix.quantize(gaussian, config)
    c = qm.codes()
    deq = qm.dequantize().reshape(-1, 32)
    blocks = gaussian.reshape(-1, 32)
    levels = nf_codebook(3)
    scale = deq.abs().amax(dim=1, keepdim=True)  # some code hits +-1 in each block
    candidates = levels[None, None, :] * scale[:, :, None]  # (blocks, 1, L)
    brute = (blocks[:, :, None] - candidates).abs().argmin(dim=2)
    assert (brute == c.codes.reshape(-1, 32).long()).float().mean() > 0.999


def test_error_falls_as_bits_rise(gaussian):
    for b0, b1, B0, B1 in itertools.product((2, 8), ("bf16", "fp32"), (16, 64), (16, 256)):
        errors = [
            (gaussian - simulate(gaussian, QuantConfig(b, b0, b1, B0, B1))).square().sum().item()
            for b in (2, 3, 4, 8)
        ]
        assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 20


def test_more_scale_bits_do_not_hurt(gaussian):
    for b in (3, 4):
        errors = [
            (gaussian - simulate(gaussian, QuantConfig(b, b0, "fp32", 64, 64))).square().sum().item()
            for b0 in (2, 3, 4, 8)
        ]
        assert errors[-1] <= errors[0]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_error_on_gaussian_matches_direct_computation(bits):
    # Reference: blocks of 64 scaled by their exact absmax, each weight rounded to the
    # nearest level by brute force (relative MSE measured here: NF2 0.32, NF3 0.039,
    # NF4 0.0085). Double quantization with 8-bit scales may only move it a little.
    W = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    blocks = W.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    levels = nf_codebook(bits)
    nearest = levels[(blocks[:, :, None] / absmax[:, :, None] - levels).abs().argmin(dim=2)] * absmax
    expected = (blocks - nearest).square().mean() / W.square().mean()
    ours = (W - simulate(W, QuantConfig(bits, 8, "fp32", 64, 256))).square().mean() / W.square().mean()
    assert ours.item() == pytest.approx(expected.item(), rel=0.03)


def test_zero_and_constant_matrices():
    Z = torch.zeros(10, 20)
    assert torch.equal(QuantizedMatrix.quantize(Z, QLORA_NF4).dequantize(), Z)
    C = torch.full((8, 8), 0.5)
    assert torch.allclose(QuantizedMatrix.quantize(C, QLORA_NF4).dequantize(), C)


@pytest.mark.parametrize(
    "weight,message",
    [
        (torch.randn(4, 4, 4), "must be a 2-D matrix"),
        (torch.randn(8), "must be a 2-D matrix"),
        (torch.tensor([[1.0, float("nan")]]), "1 NaN and 0 Inf"),
        (torch.tensor([[1.0, float("inf")], [float("-inf"), 0.0]]), "0 NaN and 2 Inf"),
        (torch.zeros(0, 5), "is empty"),
        (torch.ones(3, 3, dtype=torch.int64), "floating-point"),
        ([[1.0]], "must be a torch.Tensor"),
    ],
)
def test_bad_weights(weight, message):
    with pytest.raises(LQLoRAInputError, match=message):
        QuantizedMatrix.quantize(weight, QLORA_NF4)


@pytest.mark.parametrize(
    "fields,message",
    [
        ((5, 8, "fp32", 64, 256), "unknown bit width b=5"),
        ((4, 7, "fp32", 64, 256), "unknown scale bit width b0=7"),
        ((4, 8, "fp8", 64, 256), "unknown scale format b1='fp8'"),
        ((4, 8, "fp32", 0, 256), "block size B0=0"),
    ],
)
def test_bad_configs(fields, message):
    with pytest.raises(LQLoRAInputError, match=message):
        QuantConfig(*fields)


def test_config_names_round_trip():
    for c in CONFIG_GRID:
        assert QuantConfig.parse(c.name) == c
    with pytest.raises(LQLoRAInputError, match="cannot parse config name"):
        QuantConfig.parse("nf4")
