"""Confirmed plans for the error-table benchmark: exact rows computed for real (as the
allocation_plan stage computes them), plans confirmed per budget and scored against the
exhaustive plan."""

import time

import pandas as pd
import torch

from lqlora_dagster.allocate.confirm import confirm_plan
from lqlora_dagster.allocate.ilp import solve_ilp
from lqlora_dagster.decompose.lq import LQSettings
from lqlora_dagster.error_table.compute import compute_rows

try:
    from _real_matrices import all_target_matrices, layer_matrices
    from _rows import requests_for
except ImportError:  # run as a module from the repo root
    from bench._real_matrices import all_target_matrices, layer_matrices
    from bench._rows import requests_for

BUDGETS = (2.5, 2.75, 3.0, 3.25, 3.5, 4.0)


class ExactRows:
    """Cold-start rows computed on demand through the pipeline's loop and kept (the
    pipeline keeps them in DuckDB)."""

    def __init__(self, mats: dict[str, torch.Tensor], settings: LQSettings, workers: int):
        self.mats, self.settings, self.workers, self.known, self.seconds = mats, settings, workers, {}, 0.0
        self.wall = 0.0  # of the confirmations, ILP rounds included

    def __call__(self, rows: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        t0 = time.perf_counter()
        todo: dict[str, list[str]] = {}
        for m, c in rows:
            if (m, c) not in self.known:
                todo.setdefault(m, []).append(c)

        def commit(request, results) -> None:
            self.known.update({(request.target.name, r.config.name): r.error for r in results})

        requests = requests_for(self.mats, todo, self.settings)
        compute_rows(requests, self.settings, lambda t: self.mats[t.name], lambda r: None, commit, self.workers)
        self.seconds += time.perf_counter() - t0
        return {r: self.known[r] for r in rows}


def confirmed_scores(
    table: pd.DataFrame, ref: pd.DataFrame, exact: ExactRows, margin: float
) -> tuple[list[dict], int]:
    """Per budget: the confirmed plan from `table` against the seed-0 exhaustive plan
    (under the seed-0 errors); and how many confirmed rows differ from the reference's."""
    seed0 = ref.set_index(["matrix", "config"])["error"]
    out = []
    for budget in BUDGETS:
        t0 = time.perf_counter()
        done = confirm_plan(table, budget, exact, solve_ilp, margin)
        exact.wall += time.perf_counter() - t0
        exhaustive = solve_ilp(ref, budget)
        out.append(
            {
                "budget": budget,
                "same": done.plan.assignment == exhaustive.assignment,
                "vs_seed0": sum(seed0[k] for k in done.plan.assignment.items()) / exhaustive.objective - 1,
                "bits": done.plan.bits_per_param,
                "vs_seed1": None,
                "rounds": done.rounds,
            }
        )
    mismatched = sum(abs(v - seed0[k]) > 1e-6 * seed0[k] for k, v in exact.known.items())
    return out, mismatched


def report_confirmations(args, tables: dict[str, pd.DataFrame], settings: LQSettings) -> dict:
    """Confirm each of --confirm-variants' plans (exact rows computed for real) and print
    them; returns {"<variant> + confirm": (variant, seconds, plan scores)}."""
    print(f"\n# confirmed plans (margin {args.confirm_margin:g}) vs the exhaustive (seed 0) plan, seed-0 errors")
    mats = layer_matrices(args.sample_layers)
    walls = {}
    for key in args.confirm_variants:
        exact = ExactRows(mats, settings, args.threads)
        scores, mismatched = confirmed_scores(tables[key], tables["ref"], exact, args.confirm_margin)
        walls[f"{key} + confirm"] = (key, exact.wall, scores)
        print(
            f"  {key} + confirm: {len(exact.known)} exact rows ({len(exact.known) / len(mats):.1f} per matrix, "
            f"{mismatched} differ from the reference's), {exact.seconds:.1f} s computing them, "
            f"{exact.wall:.1f} s with the ILP rounds"
        )
        for p in scores:
            print(
                f"    budget {p['budget']:.2f}: same {p['same']!s:5s} {p['vs_seed0']:+.3%}"
                f"   ({p['bits']:.3f} bits/param, {p['rounds']} rounds)"
            )
    return walls



def full_confirmation(args, table: pd.DataFrame) -> None:
    """Confirm one plan on the whole table, computing its exact rows (as allocation_plan)."""
    exact = ExactRows(all_target_matrices(), LQSettings(rank=args.rank), args.threads)
    t0 = time.perf_counter()
    done = confirm_plan(table, args.confirm_budget, exact, solve_ilp, args.confirm_margin)
    wall = time.perf_counter() - t0
    unconfirmed = solve_ilp(table, args.confirm_budget)
    print(
        f"  confirmation @ {args.confirm_budget:g} bits, margin {args.confirm_margin:g}: {wall:.1f} s wall "
        f"({exact.seconds:.1f} s computing {len(exact.known)} exact rows, {done.rounds} ILP rounds); "
        f"objective {done.plan.objective:.5g} vs {unconfirmed.objective:.5g} estimated by the unconfirmed plan"
    )
