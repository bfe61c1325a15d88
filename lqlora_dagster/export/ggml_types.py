"""llama.cpp's quantization types that an export may choose among, and what they cost.

A GGML type stores a row in blocks (32 weights for the legacy types and IQ4_NL, 256 for
the k-quants, IQ4_XS and IQ3_S), so a type fits a tensor only when its row length is a
multiple of the block: on rows of 576 (SmolLM2) no k-quant fits and llama.cpp itself
falls back to the legacy types. Sizes come from the `gguf` package's table, the same one
llama.cpp's writer uses.
"""

from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from lqlora_dagster.errors import LQLoRAInputError


@dataclass(frozen=True)
class GGMLType:
    name: str  # llama.cpp's spelling, e.g. "Q4_K"

    @property
    def ggml(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.name]

    @property
    def block(self) -> int:
        return GGML_QUANT_SIZES[self.ggml][0]

    @property
    def block_bytes(self) -> int:
        return GGML_QUANT_SIZES[self.ggml][1]

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block

    def fits(self, row_length: int) -> bool:
        return row_length % self.block == 0

    def nbytes(self, rows: int, row_length: int) -> int:
        return rows * (row_length // self.block) * self.block_bytes


# the quantized types llama.cpp runs on CPU and its presets use, from 8.5 down to 2.6
# bits per weight; the ones that need an importance matrix to be usable (IQ2_*, IQ1_*)
# are left out
CANDIDATES = tuple(
    GGMLType(n)
    for n in ("Q8_0", "Q6_K", "Q5_1", "Q5_K", "Q5_0", "Q4_1", "Q4_K", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K", "IQ3_S", "Q2_K")
)
# types a tensor may be kept in without quantizing (norms, and a non-target's choice)
PLAIN = tuple(GGMLType(n) for n in ("F32", "F16", "BF16"))
BY_NAME = {t.name: t for t in CANDIDATES + PLAIN}


def ggml_type(name: str) -> GGMLType:
    """A type by llama.cpp's name (any case); an unknown one is refused with the list."""
    found = BY_NAME.get(name.upper())
    if found is None:
        raise LQLoRAInputError(f"unknown llama.cpp type {name!r}; choose one of {', '.join(BY_NAME)}")
    return found


def fitting(row_length: int, allowed: tuple[GGMLType, ...] = CANDIDATES) -> list[GGMLType]:
    """The candidate types whose blocks divide a row of this length."""
    return [t for t in allowed if t.fits(row_length)]
