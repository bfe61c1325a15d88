"""The fast path for the error table, exploiting the grid's structure.

1. Anchors: one full LQ decomposition (cold start, as the reference does) per group of
   configs sharing the fields in `anchor_fields` (default (b, B0): 12 of 432).
2. Siblings (same b and B0, other scale storage) reuse their anchor's factors: with
   `refine_steps` = 0 a sibling's error is that of q_c(W - L_anchor), computed for the
   whole group in one batched pass; with k > 0 each takes k alternating steps of its
   own from there. Measured on SmolLM2 (bench/bench_error_table.py, rank 16, layers 0
   and 15): 20.7x faster than the exhaustive table, but 70% of configs differ from it
   by > 1% (median 5.5%; worst where coarse scale storage dominates, e.g. NF8 with
   2-bit block scales), and ILP plans built on it cost 1.6-2.7% more error. For scale:
   the exhaustive table rerun with another SVD seed differs by > 1% on 52% of configs
   and its plans by 0.4-1.6%. Warm-starting anchors from each other was tried and
   lands in worse fixpoints.
3. All quantization in here is table-based (`quant/lut.py`): same error to ~1e-6.
The exhaustive path (`error_table.exhaustive_errors`) is the reference it is
benchmarked against (bench/bench_error_table.py).
"""

import dataclasses
import time
from collections import defaultdict

import torch

from lqlora_dagster.decompose.lowrank import LowRank
from lqlora_dagster.decompose.lq import LQSettings, lq_error_estimate
from lqlora_dagster.error_table import ConfigError
from lqlora_dagster.methods import Method
from lqlora_dagster.quant.batched_error import quantization_errors
from lqlora_dagster.quant.config import SCALE_FORMAT_BITS, QuantConfig


@dataclasses.dataclass(frozen=True)
class FastSettings:
    anchor_fields: tuple[str, ...] = ("b", "B0")
    refine_steps: int = 0


def anchor_of(group: list[QuantConfig]) -> QuantConfig:
    """The most precisely stored member: most scale bits, widest format, smallest groups."""
    return max(group, key=lambda c: (c.b0, SCALE_FORMAT_BITS[c.b1], c.b1 == "fp16", -c.B1))


def fast_errors(
    W: torch.Tensor,
    configs: tuple[QuantConfig, ...],
    method: Method,
    settings: LQSettings,
    fisher: torch.Tensor | None = None,
    fast: FastSettings = FastSettings(),
) -> list[ConfigError]:
    """Errors of the LQ init for every config, in the order given."""
    if method.init != "lq":
        raise ValueError(f"the fast path covers the LQ init only, not {method.init!r}")
    F = fisher if method.fisher else None
    groups: dict[tuple, list[QuantConfig]] = defaultdict(list)
    for c in configs:
        groups[tuple(getattr(c, f) for f in fast.anchor_fields)].append(c)
    refine = dataclasses.replace(settings, max_iters=max(1, fast.refine_steps))
    results: dict[QuantConfig, ConfigError] = {}
    for key in sorted(groups, key=lambda k: tuple(-v if isinstance(v, int) else 0 for v in k)):
        group = groups[key]
        t0 = time.perf_counter()
        anchor = anchor_of(group)
        d = lq_error_estimate(W, anchor, settings, F)
        factors = LowRank(d.L1, d.L2)
        results[anchor] = ConfigError(anchor, d.error, len(d.trace), time.perf_counter() - t0)
        siblings = [c for c in group if c != anchor]
        t1 = time.perf_counter()
        if fast.refine_steps == 0:
            errors = quantization_errors(W - factors.product(), siblings, F)
            per = (time.perf_counter() - t1) / max(1, len(siblings))
            results.update({c: ConfigError(c, e, 0, per) for c, e in zip(siblings, errors)})
            continue
        for c in siblings:
            t2 = time.perf_counter()
            r = lq_error_estimate(W, c, refine, F, start=factors)
            results[c] = ConfigError(c, r.error, len(r.trace), time.perf_counter() - t2)
    return [results[c] for c in configs]
