"""Plan confirmation: every pick ends exact, and estimates that are lower bounds give
the exhaustive table's plan while computing only a part of its rows."""

import numpy as np
import pandas as pd
import pytest
import torch

from lqlora_dagster.allocate.budget import Budget
from lqlora_dagster.allocate.confirm import confirm_plan
from lqlora_dagster.allocate.ilp import solve_ilp
from lqlora_dagster.allocate.uniform import solve_uniform
from lqlora_dagster.decompose.lq import LQSettings, lq_error_estimate
from lqlora_dagster.error_estimation.estimates import estimated_errors
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.pipeline.handles import TableRef
from lqlora_dagster.pipeline.planning import plan_id, row_margin
from lqlora_dagster.pipeline.settings import PlanSettings
from lqlora_dagster.quant.config import CONFIG_GRID, storage_bits
from tests.method.test_allocation import random_table


def lookup(exact: dict, asked: list):
    def rows(new):
        asked.extend(new)
        return {r: exact[r] for r in new}

    return rows


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [2.6, 3.2])
def test_lower_bound_estimates_give_the_exhaustive_plan(seed, budget):
    exact_table = random_table(seed, n_matrices=8, n_configs=6)
    exact = dict(zip(zip(exact_table["matrix"], exact_table["config"], [0] * len(exact_table)), exact_table["error"]))
    # estimates up to 30% too high: lowered by 25% they are lower bounds everywhere
    over = np.random.default_rng(seed + 100).uniform(1.0, 1.3, len(exact_table))
    estimated = exact_table.assign(error=exact_table["error"] * over)
    asked: list = []
    done = confirm_plan(estimated, budget, lookup(exact, asked), solve_ilp, margin=0.25)
    assert done.plan.objective == pytest.approx(solve_ilp(exact_table, budget).objective, rel=1e-9)
    assert all(row in done.exact for row in done.plan.rows())
    assert len(set(asked)) == len(asked) < len(exact_table)  # nothing asked twice, not everything


@pytest.mark.parametrize("solve", [solve_ilp, solve_uniform])
def test_every_pick_is_exact_even_with_estimates_off_both_ways(solve):
    exact_table = random_table(7, n_matrices=8, n_configs=6)
    exact = dict(zip(zip(exact_table["matrix"], exact_table["config"], [0] * len(exact_table)), exact_table["error"]))
    noise = np.random.default_rng(1).uniform(0.7, 1.3, len(exact_table))
    done = confirm_plan(exact_table.assign(error=exact_table["error"] * noise), 3.0, lookup(exact, []), solve, 0.0)
    picks = list(done.plan.rows())
    assert done.plan.objective == pytest.approx(sum(exact[p] for p in picks), rel=1e-12)
    assert done.plan.meets_budget and done.rounds >= 1


def test_on_real_decompositions_the_plan_is_the_exhaustive_one(gaussian):
    """Fast rows of real LQ decompositions, confirmed with cold-start ones: the plan
    comes out at the exhaustive table's objective, from a fraction of its rows."""
    settings = LQSettings(rank=4, max_iters=8)
    configs = tuple(c for c in CONFIG_GRID if c.B0 == 64 and c.b1 == "fp16")  # 48 configs
    g = torch.Generator().manual_seed(11)
    mats = {f"m{i}": gaussian * (1 + i) + 0.02 * torch.randn(gaussian.shape, generator=g) for i in range(4)}

    def table(errors) -> pd.DataFrame:
        return pd.DataFrame(
            [
                dict(matrix=m, config=c.name, numel=W.numel(), storage_bits=storage_bits(W.numel(), c), error=e)
                for m, W in mats.items()
                for c, e in zip(configs, errors(W))
            ]
        )

    exhaustive = table(lambda W: [lq_error_estimate(W, c, settings).error for c in configs])
    fast = table(lambda W: [r.error for r in estimated_errors(W, configs, settings)])
    exact = dict(zip(zip(exhaustive["matrix"], exhaustive["config"], [0] * len(exhaustive)), exhaustive["error"]))
    asked: list = []
    done = confirm_plan(fast, 3.3, lookup(exact, asked), solve_ilp, margin=0.1)
    best = solve_ilp(exhaustive, 3.3).objective
    print(f"confirmed plan {done.plan.objective / best - 1:+.3%} of the exhaustive one, {len(asked)} of {len(exact)} rows")
    assert done.plan.objective <= best * 1.005
    assert len(asked) < len(exact) / 2


@pytest.mark.parametrize("margin", [-0.1, 1.0, True])
def test_margin_must_be_a_fraction(margin):
    with pytest.raises(LQLoRAInputError, match="confirm_margin must be a number in"):
        PlanSettings(confirm_margin=margin)


def test_each_kind_of_estimated_row_is_confirmed_with_its_own_margin():
    """Base-rank rows, lower ranks (truncated factors, 7-100% high) and higher ranks
    (one step up, far higher) each count lower by their own margin until exact."""
    s = PlanSettings(confirm_margin=0.08, lower_rank_margin=0.1, other_rank_margin=0.35)

    def ref(rank: int, priced_on: int | None) -> TableRef:
        return TableRef("lqlora-fisher", f"t{rank}", rank, None, [], 0, f"x{rank}", priced_on)

    assert [row_margin(ref(16, None), s), row_margin(ref(8, 16), s), row_margin(ref(64, 16), s)] == [0.08, 0.1, 0.35]
    with_lower, only_higher = [ref(8, 16), ref(16, None)], [ref(16, None), ref(64, 16)]
    wider = PlanSettings(confirm_margin=0.08, lower_rank_margin=0.2, other_rank_margin=0.35)
    budget = Budget("lowrank", 4.0)
    assert plan_id(with_lower, budget, 0.08, s) != plan_id(with_lower, budget, 0.08, wider)
    assert plan_id(only_higher, budget, 0.08, s) == plan_id(only_higher, budget, 0.08, wider)
    with pytest.raises(LQLoRAInputError):
        PlanSettings(lower_rank_margin=1.0)
