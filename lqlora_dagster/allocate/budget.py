"""What a budget counts: the quantized part, the low-rank factors too, or the whole model.

| kind      | value          | counts                                                    |
| quantized | bits per param | packed Q of the targets / target weights (the paper's)    |
| lowrank   | bits per param | Q + the factors L1, L2 / target weights                   |
| total     | bytes          | the saved model: Q + factors + every tensor that is not a |
|           |                | target (embeddings, norms, heads) at its stored precision |

All three are one linear constraint on the candidates' storage: `counted_bits` is a
candidate's storage as the kind counts it, `capacity` the bits per target weight the
kind allows. The factors count at `factor_bits` each (16 by default: they are trained
in fp32 but shipped in 16 bits, as LoRA adapters are).
"""

import math
import re
from dataclasses import dataclass

import pandas as pd

from lqlora_dagster.errors import LQLoRAInputError

BUDGET_KINDS = ("quantized", "lowrank", "total")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class Budget:
    kind: str  # one of BUDGET_KINDS
    value: float  # bits per target weight (quantized, lowrank) or bytes (total)

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise LQLoRAInputError(f"unknown budget kind {self.kind!r}; choose from {', '.join(BUDGET_KINDS)}")
        if not math.isfinite(self.value) or self.value <= 0:
            raise LQLoRAInputError(f"a budget must be positive, got {self.value!r}")

    @property
    def counts_factors(self) -> bool:
        return self.kind != "quantized"

    def describe(self) -> str:
        if self.kind == "total":
            return f"{self.value / 1e6:g} MB in all"
        return f"{self.value:g} bits/param" + (" incl. low-rank" if self.kind == "lowrank" else "")


def parse_size(text: str) -> int:
    """Bytes in '80MB', '1.5 GB', '300MiB' or '83886080' (decimal units; KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise LQLoRAInputError(f"cannot read the size {text!r}; write it like 80MB, 1.5GB or 300MiB")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise LQLoRAInputError(f"the size {text!r} must be positive")
    return size


def factor_bits(rank, rows, cols, bits: int):
    """Storage of L1 (rows x rank) and L2 (rank x cols) at `bits` per entry (numbers or columns)."""
    return rank * (rows + cols) * bits


def counted_bits(table: pd.DataFrame, budget: Budget, bits: int) -> pd.Series:
    """Each candidate's storage as the budget counts it (`table` has storage_bits,
    rank, rows, cols)."""
    quantized = table["storage_bits"].astype(float)
    if not budget.counts_factors:
        return quantized
    return quantized + factor_bits(table["rank"], table["rows"], table["cols"], bits).astype(float)


def capacity(budget: Budget, target_numel: int, nontarget_bytes: int) -> float:
    """The budget in bits per target weight, the unit the solvers take."""
    if budget.kind != "total":
        return budget.value
    left = budget.value - nontarget_bytes
    if left <= 0:
        raise LQLoRAInputError(
            f"a total size of {budget.value / 1e6:.2f} MB leaves nothing for the quantized matrices: the tensors "
            f"that are not targets (embeddings, norms, heads) alone take {nontarget_bytes / 1e6:.2f} MB at "
            f"their stored precision; ask for more than that"
        )
    return 8 * left / target_numel


@dataclass(frozen=True)
class Figures:
    """A plan's size in all three units, whichever it was asked to meet."""

    bits_quantized: float  # Q / target weights
    bits_with_lowrank: float  # (Q + factors) / target weights
    total_bytes: int  # Q + factors + non-target tensors

    def of(self, kind: str) -> float:
        return {"quantized": self.bits_quantized, "lowrank": self.bits_with_lowrank, "total": self.total_bytes}[kind]


def figures(picked: pd.DataFrame, nontarget_bytes: int, bits: int) -> Figures:
    """The figures of the picked rows (one per matrix: storage_bits, rank, rows, cols, numel)."""
    numel = float(picked["numel"].sum())
    q = float(picked["storage_bits"].sum())
    lowrank = float(factor_bits(picked["rank"], picked["rows"], picked["cols"], bits).sum())
    return Figures(q / numel, (q + lowrank) / numel, int(math.ceil((q + lowrank) / 8)) + int(nontarget_bytes))
