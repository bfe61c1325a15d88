"""NormalFloat codebooks and bit packing."""

import pytest
import torch

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.quant.bitpack import pack_bits, packed_nbytes, unpack_bits
from lqlora_dagster.quant.normal_float import nearest_level, nf_codebook

# QLoRA's published NF4 table (bitsandbytes), to 4 decimals.
QLORA_NF4 = [
    -1.0,
    -0.6962,
    -0.5251,
    -0.3949,
    -0.2844,
    -0.1848,
    -0.0910,
    0.0,
    0.0796,
    0.1609,
    0.2461,
    0.3379,
    0.4407,
    0.5626,
    0.7230,
    1.0,
]


def test_nf4_matches_qlora_table():
    assert nf_codebook(4).tolist() == pytest.approx(QLORA_NF4, abs=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codebook_shape(bits):
    levels = nf_codebook(bits)
    assert levels.numel() == 2**bits
    assert (levels[1:] > levels[:-1]).all()
    assert levels.min() == -1 and levels.max() == 1
    assert int((levels == 0).sum()) == 1
    assert int((levels > 0).sum()) == 2 ** (bits - 1)


@pytest.mark.parametrize("bits", [1, 5, 16, "4"])
def test_unknown_bit_width(bits):
    with pytest.raises(LQLoRAInputError, match="unknown NormalFloat bit width"):
        nf_codebook(bits)


def test_nearest_level_agrees_with_brute_force():
    x = torch.rand(10_000, generator=torch.Generator().manual_seed(1)) * 2.2 - 1.1
    for bits in (2, 3, 4):
        levels = nf_codebook(bits)
        brute = (x[:, None] - levels[None]).abs().argmin(dim=1)
        assert torch.equal(nearest_level(x, levels).long(), brute)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_pack_round_trip(bits, n):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.numel() == packed_nbytes(n, bits) == -(-n * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_three_bit_layout_is_dense():
    # eight 3-bit codes fill exactly three bytes, little-endian bit order
    codes = torch.tensor([1, 0, 0, 0, 0, 0, 0, 7], dtype=torch.uint8)
    assert pack_bits(codes, 3).tolist() == [1, 0, 0b11100000]


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 9)
