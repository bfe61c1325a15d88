"""The methods we compare, as data: an init (`decompose/inits.py`) and an allocation.

| method         | init       | allocation                | label                   |
| qlora          | zero       | uniform QLoRA NF2/NF3/NF4 | QLoRA NF-k              |
| loftq          | loftq      | uniform QLoRA NF2/NF3/NF4 | LoftQ NF-k              |
| qlora-ilp      | zero       | ILP over the grid         | QLoRA-ILP               |
| lqlora-uniform | lq         | best single config        | LQ-LoRA uniform         |
| lqlora         | lq         | ILP over the grid         | LQ-LoRA (ILP)           |
| lqlora-fisher  | lq-fisher  | ILP over the grid         | LQ-LoRA (ILP + Fisher)  |

A new baseline is one entry in `METHODS` (plus its tests).
"""

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch

from lqlora_dagster.allocate.uniform import solve_uniform
from lqlora_dagster.decompose.inits import INITS, Init
from lqlora_dagster.decompose.lq import Decomposition, LQSettings
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.quant.config import QLORA_NF3, QLORA_NF4, QuantConfig

QLORA_NF2 = QuantConfig(b=2, b0=8, b1="fp32", B0=64, B1=256)
QLORA_CONFIGS = (QLORA_NF2, QLORA_NF3, QLORA_NF4)


def _solve_ilp(table: pd.DataFrame, budget: float):
    from lqlora_dagster.allocate.ilp import solve_ilp  # pyomo loads only when a plan is solved

    return solve_ilp(table, budget)


@dataclass(frozen=True)
class Allocation:
    """How a method turns its error table into a plan."""

    name: str  # "ilp" or "uniform"
    solve: Callable[[pd.DataFrame, float], object]


ILP = Allocation("ilp", _solve_ilp)
UNIFORM = Allocation("uniform", solve_uniform)


@dataclass(frozen=True)
class Method:
    name: str
    init: Init
    allocation: Allocation
    label: str  # how reports name it
    configs: tuple[QuantConfig, ...] | None = None  # None: the run's grid

    @property
    def fisher(self) -> bool:
        return self.init.fisher

    @property
    def has_lowrank_init(self) -> bool:
        return self.init.has_lowrank

    @property
    def ilp(self) -> bool:
        return self.allocation is ILP

    def candidate_configs(self, grid: tuple[QuantConfig, ...]) -> tuple[QuantConfig, ...]:
        return self.configs if self.configs is not None else grid

    @property
    def allocates_rank(self) -> bool:
        """Whether the ILP may pick this method's rank per matrix (a low-rank init the ILP plans)."""
        return self.has_lowrank_init and self.ilp

    def decompose(
        self, W: torch.Tensor, config: QuantConfig, settings: LQSettings, fisher: torch.Tensor | None = None,
        rank: int | None = None,
    ) -> Decomposition:
        """The method's Q, L1, L2 for one matrix at `rank` (default: the settings' rank)."""
        return self.init.decompose_at(W, config, settings.rank if rank is None else rank, settings, fisher)

    def label_for(self, bits: float | None = None) -> str:
        """'QLoRA NF4' for the fixed-config baselines, the label otherwise."""
        if self.configs is not None and bits is not None:
            return f"{self.label} NF{int(bits)}"
        return self.label


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("qlora", INITS["zero"], UNIFORM, "QLoRA", configs=QLORA_CONFIGS),
        Method("loftq", INITS["loftq"], UNIFORM, "LoftQ", configs=QLORA_CONFIGS),
        Method("qlora-ilp", INITS["zero"], ILP, "QLoRA-ILP"),
        Method("lqlora-uniform", INITS["lq"], UNIFORM, "LQ-LoRA uniform"),
        Method("lqlora", INITS["lq"], ILP, "LQ-LoRA (ILP)"),
        Method("lqlora-fisher", INITS["lq-fisher"], ILP, "LQ-LoRA (ILP + Fisher)"),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise LQLoRAInputError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_label(name: str, bits: float | None = None) -> str:
    """A report's name for a method ('reference' for the uncompressed model)."""
    if name == "reference":
        return "fp32 reference"
    return METHODS[name].label_for(bits) if name in METHODS else name
