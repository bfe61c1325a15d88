"""Estimated rows: the fast path, exploiting the grid's structure.

1. Anchors: one full LQ decomposition (cold start, exactly the exact row's) per group of
   configs sharing the fields in `anchor_fields` (default (b, B0): 12 of the 432).
2. Siblings (same b and B0, other scale storage) start from their anchor's factors L:
   - fine scale codes (b0 > `refine_max_b0`): the error of q_c(W - L), the whole group
     priced in one batched pass;
   - coarse scale codes (default b0 = 2, 3) clip blocks differently, so factors fitted
     under 8-bit scales overprice them. Per (b0, B1), the most precisely stored member
     takes `refine_steps` alternating steps of its own from there, and its siblings that
     differ only in the group-scale format b1 are priced on the factors it ends with.
3. Other ranks (`other_ranks`), from the base rank's factors, so the base rank's rows
   are the single-rank table's own:
   - a lower rank r: the configs that shared factors above are priced on those factors
     truncated to their leading r components (the best rank-r part of L1 L2, as the
     SVD ordered them); with `LOWER_RANK_STEPS` > 0 the set's leader first takes that
     many alternating steps at rank r;
   - a higher rank r: each anchor takes one alternating step at rank r from its base
     factors and its whole (b, B0) group is priced on where it ends.
   These rows run high (not optimised at their own rank), so plans confirm them with
   margins of their own (`lower_rank_margin` below the base rank, `other_rank_margin`
   above); bench/results/multirank_table.md measures how high and what the extra ranks
   cost.
4. All quantization in here is table-based (`quant/lut.py`): same error to ~1e-6.

The rows are estimates, mostly a little high (factors fitted to a neighbouring
config). Plans made on them are confirmed with exact rows (`allocate/confirm.py`);
how close they come is measured by bench/bench_error_table.py (bench/results/).
"""

import dataclasses
import time
from collections import defaultdict

import torch

from lqlora_dagster.decompose.inits import ConfigError
from lqlora_dagster.decompose.lowrank import LowRank
from lqlora_dagster.decompose.lq import LQInput, LQSettings, lq_error_estimate, prepare
from lqlora_dagster.quant.batched_error import quantization_errors
from lqlora_dagster.quant.config import SCALE_FORMAT_BITS, QuantConfig


@dataclasses.dataclass(frozen=True)
class FastSettings:
    """Which configs share a decomposition, and which siblings then take steps of their own."""

    anchor_fields: tuple[str, ...] = ("b", "B0")
    refine_steps: int = 2
    # siblings whose block-scale codes have at most this many bits refine: their coarse
    # scales clip blocks differently, and factors fitted under 8-bit scales overprice them
    refine_max_b0: int = 3
    # stepped siblings that agree on these fields share one stepped decomposition (its
    # most precisely stored member's); the rest of the subgroup is priced on its factors.
    # The default lets the three group-scale formats (bf16/fp16/fp32: one float per
    # B0*B1 weights) share; add "b1" to step every coarse-scale sibling on its own.
    refine_by: tuple[str, ...] = ("b0", "B1")


# lower ranks of a multi-rank table: alternating steps each factor set's leader takes at
# that rank from its factors truncated (0: price on the truncated factors alone). Part
# of the lower ranks' table keys (`tables.py`), not of FastSettings: single-rank tables
# keep their keys.
LOWER_RANK_STEPS = 0


def anchor_of(group: list[QuantConfig]) -> QuantConfig:
    """The most precisely stored member: most scale bits, widest format, smallest groups."""
    return max(group, key=lambda c: (c.b0, SCALE_FORMAT_BITS[c.b1], c.b1 == "fp16", -c.B1))


def estimated_errors(
    W: torch.Tensor,
    configs: tuple[QuantConfig, ...],
    settings: LQSettings,
    fisher: torch.Tensor | None = None,
    fast: FastSettings = FastSettings(),
) -> list[ConfigError]:
    """Estimated errors of the LQ init (Fisher-weighted with `fisher`) for every
    config, in the order given."""
    return estimated_errors_by_rank(W, configs, settings, fisher, fast)[settings.rank]


def estimated_errors_by_rank(
    W: torch.Tensor,
    configs: tuple[QuantConfig, ...],
    settings: LQSettings,
    fisher: torch.Tensor | None = None,
    fast: FastSettings = FastSettings(),
    other_ranks: tuple[int, ...] = (),
    lower_rank_steps: int = LOWER_RANK_STEPS,
) -> dict[int, list[ConfigError]]:
    """{rank: estimated rows in the order of `configs`} at `settings.rank` (the base:
    the single-rank table's rows, bit for bit) and at each of `other_ranks`, priced on
    the base's factors: truncated for a lower rank, one step up for a higher one."""
    bad = [r for r in other_ranks if r <= 0 or r == settings.rank]
    if bad:
        raise ValueError(f"other ranks must be positive and differ from the base rank {settings.rank}, got {bad}")
    data = prepare(W, fisher)  # checked once; the anchors' first fit is shared
    groups: dict[tuple, list[QuantConfig]] = defaultdict(list)
    for c in configs:
        groups[tuple(getattr(c, f) for f in fast.anchor_fields)].append(c)
    refine = dataclasses.replace(settings, max_iters=max(1, fast.refine_steps))
    results: dict[QuantConfig, ConfigError] = {}
    sets: list[tuple[QuantConfig, list[QuantConfig], LowRank]] = []  # (leader, members, factors)
    anchors: list[tuple[QuantConfig, list[QuantConfig], LowRank]] = []  # (anchor, its whole group, factors)
    for key in sorted(groups, key=lambda k: tuple(-v if isinstance(v, int) else 0 for v in k)):
        group = groups[key]
        t0 = time.perf_counter()
        anchor = anchor_of(group)
        d = lq_error_estimate(data, anchor, settings)
        factors = LowRank(d.L1, d.L2)
        results[anchor] = ConfigError(anchor, d.error, len(d.trace), time.perf_counter() - t0)
        anchors.append((anchor, group, factors))
        siblings = [c for c in group if c != anchor]
        stepped = [c for c in siblings if fast.refine_steps and c.b0 <= fast.refine_max_b0]
        results.update(_priced(data, factors, [c for c in siblings if c not in stepped]))
        sets.append((anchor, [c for c in group if c not in stepped], factors))
        subgroups: dict[tuple, list[QuantConfig]] = defaultdict(list)
        for c in stepped:
            subgroups[tuple(getattr(c, f) for f in fast.refine_by)].append(c)
        for sub in subgroups.values():  # start at q_c(W - L_anchor), alternate, keep the best
            lead = anchor_of(sub)
            rows, lead_factors = _stepped(data, lead, sub, refine, factors)
            results.update(rows)
            sets.append((lead, sub, lead_factors))
    out = {settings.rank: [results[c] for c in configs]}
    for rank in other_ranks:
        if rank < settings.rank:
            out[rank] = _lower_rank_rows(data, configs, sets, rank, settings, lower_rank_steps)
        else:
            out[rank] = _higher_rank_rows(data, configs, anchors, rank, settings)
    return out


def _higher_rank_rows(
    data: LQInput,
    configs: tuple[QuantConfig, ...],
    anchors: list[tuple[QuantConfig, list[QuantConfig], LowRank]],
    rank: int,
    settings: LQSettings,
) -> list[ConfigError]:
    """Each anchor takes one step at `rank` from its base factors (Q <- q(W - L), L <-
    the rank-r fit of W - Q, keep the better); its whole group is priced there."""
    step = dataclasses.replace(settings, rank=rank, max_iters=1)
    priced: dict[QuantConfig, ConfigError] = {}
    for anchor, group, factors in anchors:
        priced.update(_stepped(data, anchor, group, step, factors)[0])
    return [priced[c] for c in configs]


def _lower_rank_rows(
    data: LQInput,
    configs: tuple[QuantConfig, ...],
    sets: list[tuple[QuantConfig, list[QuantConfig], LowRank]],
    rank: int,
    settings: LQSettings,
    n_steps: int,
) -> list[ConfigError]:
    steps = dataclasses.replace(settings, rank=rank, max_iters=max(1, n_steps))
    priced: dict[QuantConfig, ConfigError] = {}
    for leader, members, factors in sets:
        start = LowRank(factors.L1[:, :rank], factors.L2[:rank])
        priced.update(
            _stepped(data, leader, members, steps, start)[0] if n_steps else _priced(data, start, members)
        )
    return [priced[c] for c in configs]


def _stepped(
    data: LQInput, leader: QuantConfig, members: list[QuantConfig], settings: LQSettings, start: LowRank
) -> tuple[dict[QuantConfig, ConfigError], LowRank]:
    """The leader alternates from `start` (`settings.max_iters` steps, keeping the best);
    the other members are priced on the factors it ends with (returned too)."""
    t0 = time.perf_counter()
    r = lq_error_estimate(data, leader, settings, start=start)
    out = {leader: ConfigError(leader, r.error, len(r.trace) - 1, time.perf_counter() - t0)}
    factors = LowRank(r.L1, r.L2)
    out.update(_priced(data, factors, [c for c in members if c != leader]))
    return out, factors


def _priced(data: LQInput, factors: LowRank, configs: list[QuantConfig]) -> dict[QuantConfig, ConfigError]:
    """Error of q_c(W - L1 L2) + L1 L2 for each config (all sharing b and B0), in one pass."""
    if not configs:
        return {}
    t0 = time.perf_counter()
    errors = quantization_errors(data.W - factors.product(), configs, data.fisher)
    per = (time.perf_counter() - t0) / len(configs)
    return {c: ConfigError(c, e, 0, per) for c, e in zip(configs, errors)}
