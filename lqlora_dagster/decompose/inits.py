"""How each method initialises a matrix's Q, L1, L2: the registry of inits.

| init        | Q, L1, L2                                        | table rows         |
| zero        | Q = q(W), L1 = 0, L2 random (QLoRA, LoRA's init)  | quantization error |
| loftq       | LoftQ alternation, 5 iterations, keep the last    | one run per config |
| lq          | LQ alternation, keep the best iterate             | one run per config |
| lq-fisher   | LQ alternation, Fisher-weighted SVD and error     | one run per config |

An init knows how to decompose one matrix and how to compute the exact error-table
rows of many configs of one matrix (the zero init prices them all in batched passes).
At rank 0 an init with a low-rank part has none: Q = q(W), and its rows are the
(Fisher-weighted) quantization errors. A new init is one class here, one registry
entry, and its tests.
"""

import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from lqlora_dagster.decompose.lq import (
    Decomposition,
    LQInput,
    LQSettings,
    loftq_decompose,
    lq_decompose,
    lq_error_estimate,
    prepare,
    qlora_init,
    quantize_only,
)
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.quant.batched_error import quantization_errors
from lqlora_dagster.quant.config import QuantConfig

LOFTQ_ITERS = 5


@dataclass(frozen=True)
class ConfigError:
    """The error an init reaches for one config of one matrix (a row of the error table)."""

    config: QuantConfig
    error: float
    iters: int
    seconds: float


@dataclass(frozen=True)
class Init:
    """Base: `name` is the `init` column of `quant_errors`; `fisher` weights by F."""

    name: str
    fisher: bool = False
    has_lowrank: bool = True  # the init fits L1, L2 to W (False: LoRA's zero start)
    estimable: bool = False  # the error table's fast path can estimate its rows

    def decompose(
        self, W: torch.Tensor, config: QuantConfig, settings: LQSettings, fisher: torch.Tensor | None = None
    ) -> Decomposition:
        raise NotImplementedError

    def decompose_at(
        self, W: torch.Tensor, config: QuantConfig, rank: int, settings: LQSettings,
        fisher: torch.Tensor | None = None,
    ) -> Decomposition:
        """The decomposition at `rank` (0: quantized only, for an init with a low-rank part)."""
        if self.has_lowrank and rank == 0:
            return quantize_only(W, config, fisher if self.fisher else None)
        return self.decompose(W, config, self._at(rank, settings), fisher)

    def exact_errors_at(
        self, W: "torch.Tensor | LQInput", configs: tuple[QuantConfig, ...], rank: int, settings: LQSettings,
        fisher: torch.Tensor | None = None,
    ) -> list[ConfigError]:
        """Exact rows at `rank` (0: the quantization errors, for an init with a low-rank part).
        `W` may come prepared (an LQInput, carrying its own Fisher diagonal: `fisher` None)."""
        if self.has_lowrank and rank == 0:
            W, fisher = _tensors(W, fisher)
            return quantization_rows(W, configs, fisher if self.fisher else None)
        return self.exact_errors(W, configs, self._at(rank, settings), fisher)

    def _at(self, rank: int, settings: LQSettings) -> LQSettings:
        """The settings at `rank`; an init without a low-rank fit keeps its own (LoRA's rank)."""
        if self.has_lowrank and rank != settings.rank:
            return dataclasses.replace(settings, rank=rank)
        return settings

    def error(
        self, W: torch.Tensor, config: QuantConfig, settings: LQSettings, fisher: torch.Tensor | None
    ) -> Decomposition:
        """The decomposition without its final encoding (same iterates, same error)."""
        return self.decompose(W, config, settings, fisher)

    def exact_errors(
        self,
        W: torch.Tensor,
        configs: tuple[QuantConfig, ...],
        settings: LQSettings,
        fisher: torch.Tensor | None = None,
    ) -> list[ConfigError]:
        """Exact rows: for each config, the error the decomposition stage will realize."""
        data = prepare(W, fisher if self.fisher else None)  # checked once, first fit shared
        out = []
        for config in configs:
            start = time.perf_counter()
            d = self.error(data, config, settings, None)
            out.append(ConfigError(config, d.error, len(d.trace), time.perf_counter() - start))
        return out


@dataclass(frozen=True)
class ZeroInit(Init):
    """QLoRA: Q = q(W) and LoRA's default init (L1 = 0), so Q + L1 L2 = Q at step 0."""

    has_lowrank: bool = False

    def decompose(self, W, config, settings, fisher=None):
        return qlora_init(W, config, settings.rank, seed=settings.seed)

    def exact_errors(self, W, configs, settings, fisher=None):
        W, fisher = _tensors(W, fisher)
        return quantization_rows(W, configs, fisher if self.fisher else None)


def _tensors(W: "torch.Tensor | LQInput", fisher: torch.Tensor | None):
    """A matrix and its Fisher diagonal, given as tensors or prepared (an LQInput)."""
    return (W.W, W.fisher) if isinstance(W, LQInput) else (W, fisher)


def quantization_rows(
    W: torch.Tensor, configs: tuple[QuantConfig, ...], weights: torch.Tensor | None = None
) -> list[ConfigError]:
    """W - q(W) for every config; configs sharing (b, B0) share the blocking and
    absmaxes, so they are priced together in one table-based pass each."""
    groups: dict[tuple[int, int], list[QuantConfig]] = defaultdict(list)
    for c in configs:
        groups[(c.b, c.B0)].append(c)
    results: dict[QuantConfig, ConfigError] = {}
    R = W.to(torch.float32)
    for group in groups.values():
        start = time.perf_counter()
        errors = quantization_errors(R, group, weights)
        per = (time.perf_counter() - start) / len(group)
        results.update({c: ConfigError(c, e, 0, per) for c, e in zip(group, errors)})
    return [results[c] for c in configs]


@dataclass(frozen=True)
class LoftQInit(Init):
    """LoftQ: quantize first, then a fixed number of alternations, keeping the last."""

    def decompose(self, W, config, settings, fisher=None):
        return loftq_decompose(W, config, settings, iters=LOFTQ_ITERS)


@dataclass(frozen=True)
class LQInit(Init):
    """LQ-LoRA: SVD first, keep the best iterate, stop when the error stops falling."""

    estimable: bool = True

    def decompose(self, W, config, settings, fisher=None):
        return lq_decompose(W, config, settings, fisher if self.fisher else None)

    def error(self, W, config, settings, fisher):
        return lq_error_estimate(W, config, settings, fisher if self.fisher else None)


INITS: dict[str, Init] = {
    "zero": ZeroInit("zero"),
    "loftq": LoftQInit("loftq"),
    "lq": LQInit("lq"),
    "lq-fisher": LQInit("lq", fisher=True),
}


def get_init(name: str) -> Init:
    if name not in INITS:
        raise LQLoRAInputError(f"unknown init {name!r}; choose one of {', '.join(INITS)}")
    return INITS[name]
