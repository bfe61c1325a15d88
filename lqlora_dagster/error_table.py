"""Rows of the error table for one matrix: e[i, c] for each candidate config c.

`exhaustive_errors` is the reference: one full decomposition per config, exactly what
the decomposition stage will later run for the config a plan picks (the same iterates,
so the same error; only the final encoding of Q is skipped). The fast path lives in
`fast_error_table.py` and is checked against this one.
"""

import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from lqlora_dagster.decompose.lq import LQSettings, lq_error_estimate
from lqlora_dagster.methods import Method
from lqlora_dagster.quant.batched_error import quantization_errors
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
    if not method.has_lowrank_init:
        return zero_init_errors(W, configs, fisher if method.fisher else None)
    out = []
    for config in configs:
        start = time.perf_counter()
        if method.init == "lq":
            d = lq_error_estimate(W, config, settings, fisher if method.fisher else None)
        else:
            d = method.decompose(W, config, settings, fisher)
        out.append(ConfigError(config, d.error, len(d.trace), time.perf_counter() - start))
    return out


def zero_init_errors(
    W: torch.Tensor, configs: tuple[QuantConfig, ...], weights: torch.Tensor | None = None
) -> list[ConfigError]:
    """QLoRA's init leaves W - q(W): plain quantization error, exact for every config.
    Configs sharing (b, B0) share the blocking and absmaxes, so they are priced together
    (one table-based pass each instead of a full quantize-dequantize)."""
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
