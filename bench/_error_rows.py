"""Error-table rows for the benchmarks through the pipeline's own loop
(`error_table.compute.compute_rows`): the matrices come from memory and the rows go
into a DataFrame instead of DuckDB, everything else is what the chunk steps and plan
confirmation run. Also the confirmed plans of the error-table benchmark (exact rows
computed for real, as the allocation_plan stage computes them, plans confirmed per
budget and scored against the exhaustive plan), and the comparisons of one table with
another that several benchmarks print."""

import time

import pandas as pd
import torch

from bench._common import all_target_matrices, layer_matrices
from lqlora_dagster.allocate.confirm import confirm_plan
from lqlora_dagster.allocate.ilp import solve_ilp
from lqlora_dagster.decompose.inits import ConfigError
from lqlora_dagster.decompose.lq import LQSettings
from lqlora_dagster.error_estimation.compute import RowRequest, compute_rows
from lqlora_dagster.error_estimation.estimates import FastSettings
from lqlora_dagster.error_estimation.table_ref import TableRef
from lqlora_dagster.models.targets import Target
from lqlora_dagster.quant.config import QuantConfig, storage_bits

BUDGETS = (2.5, 2.75, 3.0, 3.25, 3.5, 4.0)


# --- rows through the pipeline's loop ---------------------------------------------------------


def requests_for(
    mats: dict[str, torch.Tensor],
    configs: dict[str, list[str]],
    lq: LQSettings,
    fast: FastSettings | None = None,
    method: str = "lqlora",
) -> list[RowRequest]:
    """One request per matrix for `configs[name]` (names of configs)."""
    key = "bench-estimated" if fast is not None else "bench-exact"
    out = []
    for name, wanted in configs.items():
        W = mats[name]
        ref = TableRef(method, key, lq.rank, None, list(wanted), len(wanted))
        target = Target(name, W.shape[0], W.shape[1], int(name.split(".")[2]), name.rsplit(".", 1)[-1], False)
        out.append(RowRequest(ref, target, tuple(wanted), key, fast))
    return out


def as_rows(name: str, W: torch.Tensor, results: list[ConfigError]) -> list[dict]:
    return [
        {
            "matrix": name,
            "config": r.config.name,
            "numel": W.numel(),
            "storage_bits": storage_bits(W.numel(), r.config),
            "error": r.error,
        }
        for r in results
    ]


def table_rows(
    mats: dict[str, torch.Tensor],
    grid: tuple[QuantConfig, ...],
    lq: LQSettings,
    fast: FastSettings | None = None,
    workers: int = 2,
) -> pd.DataFrame:
    """Every config of `grid` for every matrix, `workers` matrices at a time on one
    torch thread each (as the pipeline computes them); estimated by `fast`, or exact."""
    names = [c.name for c in grid]
    rows: list[dict] = []

    def commit(request: RowRequest, results: list[ConfigError]) -> None:
        rows.extend(as_rows(request.target.name, mats[request.target.name], results))

    requests = requests_for(mats, {n: names for n in mats}, lq, fast)
    compute_rows(requests, lq, lambda t: mats[t.name], lambda r: None, commit, workers)
    return pd.DataFrame(rows)


# --- one table against another ----------------------------------------------------------------


def relative_differences(table: pd.DataFrame, ref: pd.DataFrame) -> pd.Series:
    """(e - e_ref) / e_ref per (matrix, config) present in both."""
    merged = table.merge(ref, on=["matrix", "config"], suffixes=("", "_ref"))
    return ((merged["error"] - merged["error_ref"]) / merged["error_ref"]).set_axis(
        pd.MultiIndex.from_frame(merged[["matrix", "config"]])
    )


def plan_gap(table: pd.DataFrame, ref: pd.DataFrame, budget: float) -> float:
    """Objective of `table`'s plan under `ref`'s errors, relative to `ref`'s own plan."""
    errors = ref.set_index(["matrix", "config"])["error"]
    mine = solve_ilp(table, budget).assignment
    return sum(errors[k] for k in mine.items()) / solve_ilp(ref, budget).objective - 1


# --- confirmed plans ------------------------------------------------------------------------


class ExactRows:
    """Cold-start rows computed on demand through the pipeline's loop and kept (the
    pipeline keeps them in DuckDB)."""

    def __init__(self, mats: dict[str, torch.Tensor], settings: LQSettings, workers: int):
        self.mats, self.settings, self.workers, self.known, self.seconds = mats, settings, workers, {}, 0.0
        self.wall = 0.0  # of the confirmations, ILP rounds included

    def __call__(self, rows: list[tuple[str, str, int]]) -> dict[tuple[str, str, int], float]:
        """Exact errors of (matrix, config, rank) rows, all at the settings' one rank;
        `known` keeps them by (matrix, config), as the reference's rows are keyed."""
        t0 = time.perf_counter()
        todo: dict[str, list[str]] = {}
        for m, c, _ in rows:
            if (m, c) not in self.known:
                todo.setdefault(m, []).append(c)

        def commit(request, results) -> None:
            self.known.update({(request.target.name, r.config.name): r.error for r in results})

        requests = requests_for(self.mats, todo, self.settings)
        compute_rows(
            requests, self.settings, lambda t: self.mats[t.name], lambda r: None, commit, self.workers
        )
        self.seconds += time.perf_counter() - t0
        return {(m, c, r): self.known[(m, c)] for m, c, r in rows}


def confirmed_scores(
    table: pd.DataFrame,
    ref: pd.DataFrame,
    exact: ExactRows,
    margin: float,
    budgets: tuple[float, ...] = BUDGETS,
) -> tuple[list[dict], int]:
    """Per budget: the confirmed plan from `table` against the seed-0 exhaustive plan
    (under the seed-0 errors); and how many confirmed rows differ from the reference's."""
    seed0 = ref.set_index(["matrix", "config"])["error"]
    out = []
    for budget in budgets:
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
    print(
        f"\n# confirmed plans (margin {args.confirm_margin:g}) vs the exhaustive (seed 0) plan, seed-0 errors"
    )
    mats = layer_matrices(args.sample_layers, args.smoke)
    walls = {}
    for key in args.confirm_variants:
        exact = ExactRows(mats, settings, args.threads)
        scores, mismatched = confirmed_scores(
            tables[key], tables["ref"], exact, args.confirm_margin, args.budgets
        )
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
    exact = ExactRows(all_target_matrices(args.smoke), LQSettings(rank=args.rank), args.threads)
    t0 = time.perf_counter()
    done = confirm_plan(table, args.confirm_budget, exact, solve_ilp, args.confirm_margin)
    wall = time.perf_counter() - t0
    unconfirmed = solve_ilp(table, args.confirm_budget)
    print(
        f"  confirmation @ {args.confirm_budget:g} bits, margin {args.confirm_margin:g}: {wall:.1f} s wall "
        f"({exact.seconds:.1f} s computing {len(exact.known)} exact rows, {done.rounds} ILP rounds); "
        f"objective {done.plan.objective:.5g} vs {unconfirmed.objective:.5g} estimated by the unconfirmed plan"
    )
