"""The methods we compare, as data: how each initialises a matrix and allocates bits.

| method         | init of Q, L1, L2                | allocation          | Fisher |
| qlora          | Q = q(W), L1 = 0, L2 random      | uniform QLoRA NFk   | no     |
| loftq          | LoftQ alternation, 5 iterations  | uniform QLoRA NFk   | no     |
| qlora-ilp      | Q = q(W), L1 = 0, L2 random      | ILP over the grid   | no     |
| lqlora-uniform | LQ alternation                   | best single config  | no     |
| lqlora         | LQ alternation                   | ILP over the grid   | no     |
| lqlora-fisher  | LQ alternation, Fisher-weighted  | ILP over the grid   | yes    |
"""

from dataclasses import dataclass
from typing import Literal

import torch

from lqlora_dagster.decompose.lq import Decomposition, LQSettings, loftq_decompose, lq_decompose, qlora_init
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.quant.config import CONFIG_GRID, QLORA_NF3, QLORA_NF4, QuantConfig

QLORA_NF2 = QuantConfig(b=2, b0=8, b1="fp32", B0=64, B1=256)
QLORA_CONFIGS = (QLORA_NF2, QLORA_NF3, QLORA_NF4)
LOFTQ_ITERS = 5


@dataclass(frozen=True)
class Method:
    name: str
    init: Literal["zero", "loftq", "lq"]
    allocation: Literal["uniform", "ilp"]
    fisher: bool = False
    configs: tuple[QuantConfig, ...] | None = None  # None: the run's grid

    @property
    def has_lowrank_init(self) -> bool:
        return self.init != "zero"

    def candidate_configs(self, grid: tuple[QuantConfig, ...]) -> tuple[QuantConfig, ...]:
        return self.configs if self.configs is not None else grid

    def decompose(
        self, W: torch.Tensor, config: QuantConfig, settings: LQSettings, fisher: torch.Tensor | None = None
    ) -> Decomposition:
        if self.init == "zero":
            return qlora_init(W, config, settings.rank, seed=settings.seed)
        if self.init == "loftq":
            return loftq_decompose(W, config, settings, iters=LOFTQ_ITERS)
        return lq_decompose(W, config, settings, fisher if self.fisher else None)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("qlora", "zero", "uniform", configs=QLORA_CONFIGS),
        Method("loftq", "loftq", "uniform", configs=QLORA_CONFIGS),
        Method("qlora-ilp", "zero", "ilp"),
        Method("lqlora-uniform", "lq", "uniform"),
        Method("lqlora", "lq", "ilp"),
        Method("lqlora-fisher", "lq", "ilp", fisher=True),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise LQLoRAInputError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["CONFIG_GRID", "METHODS", "Method", "QLORA_CONFIGS", "QLORA_NF3", "QLORA_NF4", "get_method"]
