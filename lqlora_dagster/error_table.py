"""Rows of the error table for one matrix: e[i, c] for each candidate config c.

`exhaustive_errors` is the reference: one full decomposition per config, exactly what
the allocation plan will later run for the config it picks. The fast path lives in
`fast_error_table.py` and is checked against this one.
"""

import time
from dataclasses import dataclass

import torch

from lqlora_dagster.decompose.lq import LQSettings
from lqlora_dagster.methods import Method
from lqlora_dagster.quant.config import QuantConfig


@dataclass(frozen=True)
class ConfigError:
    config: QuantConfig
    error: float
    iters: int
    seconds: float


def exhaustive_errors(
    W: torch.Tensor,
    configs: tuple[QuantConfig, ...],
    method: Method,
    settings: LQSettings,
    fisher: torch.Tensor | None = None,
) -> list[ConfigError]:
    out = []
    for config in configs:
        start = time.perf_counter()
        if method.has_lowrank_init:
            d = method.decompose(W, config, settings, fisher)
            error, iters = d.error, len(d.trace)
        else:
            error, iters = method.table_error(W, config, settings, fisher), 0
        out.append(ConfigError(config, error, iters, time.perf_counter() - start))
    return out
