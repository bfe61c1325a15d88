"""`QuantizedMatrix`: the packed value type for one quantized weight matrix.

Holds bit-packed codes, packed block-scale codes, group scales and the scale offset,
with the rule to dequantize them. Its `nbytes` is what the matrix really costs in
memory or on disk; `bits_per_param` divides that by the number of weights, so
padding is counted.
"""

from dataclasses import dataclass

import torch

from lqlora_dagster.quant import fast_decode
from lqlora_dagster.quant.bitpack import pack_bits, packed_nbytes, unpack_bits
from lqlora_dagster.quant.codec import Codes, decode, encode, padded_sizes
from lqlora_dagster.quant.config import SCALE_FORMATS, QuantConfig
from lqlora_dagster.validation import check_matrix


@dataclass(frozen=True)
class QuantizedMatrix:
    packed_codes: torch.Tensor  # uint8, ceil(n_blocks*B0*b/8)
    packed_scale_codes: torch.Tensor  # uint8, ceil(n_groups*B1*b0/8)
    group_scales: torch.Tensor  # (n_groups,) in the b1 dtype
    scale_offset: torch.Tensor  # (1,) float32
    shape: tuple[int, int]
    config: QuantConfig

    @classmethod
    def quantize(cls, weight: torch.Tensor, config: QuantConfig) -> "QuantizedMatrix":
        check_matrix(weight)
        return cls.from_codes(encode(weight, config))

    @classmethod
    def empty(cls, shape: tuple[int, int], config: QuantConfig, device: torch.device | str = "meta") -> "QuantizedMatrix":
        """Buffers of the right sizes and dtypes, unfilled (on meta: unallocated), for a
        loader to assign stored tensors into."""
        n_blocks, n_groups = padded_sizes(shape[0] * shape[1], config)
        return cls(
            torch.empty(packed_nbytes(n_blocks * config.B0, config.b), dtype=torch.uint8, device=device),
            torch.empty(packed_nbytes(n_groups * config.B1, config.b0), dtype=torch.uint8, device=device),
            torch.empty(n_groups, dtype=SCALE_FORMATS[config.b1], device=device),
            torch.empty(1, device=device),
            tuple(shape),
            config,
        )

    @classmethod
    def from_codes(cls, c: Codes) -> "QuantizedMatrix":
        config = c.config
        return cls(
            pack_bits(c.codes, config.b),
            pack_bits(c.scale_codes, config.b0),
            c.group_scales,
            c.scale_offset,
            c.shape,
            config,
        )

    def codes(self) -> Codes:
        n_blocks, n_groups = padded_sizes(self.numel, self.config)
        return Codes(
            unpack_bits(self.packed_codes, self.config.b, n_blocks * self.config.B0),
            unpack_bits(self.packed_scale_codes, self.config.b0, n_groups * self.config.B1),
            self.group_scales,
            self.scale_offset,
            self.shape,
            self.config,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (m, n) weight: by the compiled fast path where it is available,
        which gives the same values bit for bit as `reference_dequantize`."""
        fast = fast_decode.dequantize(self)
        return self.reference_dequantize(dtype) if fast is None else fast.to(dtype)

    def reference_dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Unpack every code, then `codec.decode`: the pure-torch rule, any device."""
        return decode(self.codes(), dtype)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers())

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel

    def expected_nbytes(self) -> int:
        """Bytes by the storage formula, with padding to whole blocks and groups."""
        cfg = self.config
        n_blocks, n_groups = padded_sizes(self.numel, cfg)
        scale_bytes = torch.empty((), dtype=self.group_scales.dtype).element_size()
        return (
            packed_nbytes(n_blocks * cfg.B0, cfg.b)
            + packed_nbytes(n_groups * cfg.B1, cfg.b0)
            + n_groups * scale_bytes
            + 4  # the fp32 scale offset: the fixed header
        )

    def _buffers(self) -> tuple[torch.Tensor, ...]:
        return (self.packed_codes, self.packed_scale_codes, self.group_scales, self.scale_offset)

    def to(self, device: torch.device | str) -> "QuantizedMatrix":
        moved = [t.to(device) for t in self._buffers()]
        return QuantizedMatrix(*moved, self.shape, self.config)
