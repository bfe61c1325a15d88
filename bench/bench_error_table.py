"""Error-table benchmark: the fast path against the exhaustive reference on real SmolLM2.

    python -m bench.bench_error_table [--rank 16] [--sample-layers 0 15] [--workers 2]
                                          [--variants priced by-b0 steps-each default b0le4]
                                          [--full | --full-only] [--full-variants default ...]
                                          [--confirm-margin 0.08] [--confirm-budget 3.25]
                                          [--confirm-variants default ...] [--confirm-from-saved]
                                          [--full-confirm-from-saved] [--smoke]

1. Sample (two whole layers, 14 matrices, all 432 configs): the exhaustive reference (one
   cold-start LQ decomposition per config, SVD seed 0), the same with SVD seed 1 (on
   --noise-layers, default the whole sample: how far two honest runs of the reference
   differ), and each fast-path variant, timed on the same matrices; per-config relative
   differences; the reference's resolution (configs that differ only in an fp16 vs fp32
   scale per B0*B1 weights have all but equal true errors: how far apart does it put them?).
   Each is one timed pass over the sample, --threads matrices at a time on one torch
   thread each, as every pipeline stage computes them (`per_matrix_threads.py`).
2. ILP plans over the sample at --budgets (six by default), from each table, scored two ways:
   - as the issue states it: objective under the seed-0 errors, relative to the seed-0
     plan's. Biased towards the seed-0 plan, which picked configs where seed 0 happened
     to land low (the seed-1 reference itself is 0.1-1.6% "worse" by this measure);
   - fair: objective under the seed-1 errors (independent of every table but seed 1),
     relative to the seed-0 exhaustive plan's objective under the same errors.
3. Confirmed plans (`allocate/confirm.py`, as the allocation_plan stage makes them): each
   variant's plans at those budgets, with every pick's exact row computed for real
   (cold-start `lq_error_estimate`, which must equal the reference's row: checked), the
   rows shared across budgets as the pipeline's DuckDB shares them. Their time is added
   to the variant's.
4. With --full: the fast table for all 210 target matrices per variant in --full-variants,
   fanned out over --workers processes of one torch thread each (as the pipeline's chunks),
   then the confirmation of one plan at --confirm-budget on it (--threads matrices at a time).

The reference runs the table-based quantizer (`lq_error_estimate`), which matches the
bit-packed one to ~1e-6, so the speed-up compares like with like. Prints one table.
"""

import argparse
import multiprocessing as mp
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from bench._common import add_smoke, all_target_matrices, layer_matrices, stamp
from bench._error_rows import (
    BUDGETS,
    as_rows,
    full_confirmation,
    relative_differences,
    report_confirmations,
    requests_for,
    table_rows,
)
from lqlora_dagster.allocate.ilp import solve_ilp
from lqlora_dagster.decompose.lq import LQSettings
from lqlora_dagster.error_estimation.compute import request_rows
from lqlora_dagster.error_estimation.estimates import FastSettings
from lqlora_dagster.pipeline.settings import PlanSettings
from lqlora_dagster.quant.config import CONFIG_GRID

OUT = Path(__file__).parent / "out"
VARIANTS = {
    "priced": ("one LQ per (b, B0); siblings priced on its factors", FastSettings(refine_steps=0)),
    "by-b0": ("one LQ per (b, B0, b0); siblings priced", FastSettings(("b", "B0", "b0"), refine_steps=0)),
    "steps-each": (
        "priced, then 2 own steps for every b0 <= 3 config",
        FastSettings(refine_max_b0=3, refine_by=("b0", "B1", "b1")),
    ),
    "default": ("the pipeline's: priced, then 2 steps per (b0 <= 3, B1), shared by b1", FastSettings()),
    "b0le4": ("as the default, b0 <= 4 (launchpad: refine_max_b0: 4)", FastSettings(refine_max_b0=4)),
}


def sample_run(args, settings: LQSettings) -> tuple[dict[str, float], dict[str, pd.DataFrame]]:
    """Every variant's table and the reference's (seed 0, and seed 1 on the noise layers),
    each a pass over the sample through the pipeline's row loop, --threads matrices at a
    time on one torch thread each; returns each pass's wall seconds and tables."""
    mats = layer_matrices(args.sample_layers, args.smoke)
    noisy = {n: W for n, W in mats.items() if int(n.split(".")[2]) in args.noise_layers}
    passes = {key: (mats, settings, VARIANTS[key][1]) for key in args.variants}
    passes["ref"] = (mats, settings, None)
    passes["ref_seed1"] = (noisy, replace(settings, seed=1), None)
    walls, tables = {}, {}
    for key, (on, lq, fast) in passes.items():
        t0 = time.perf_counter()
        tables[key] = table_rows(on, args.grid, lq, fast, args.threads)
        walls[key] = time.perf_counter() - t0
        print(f"  {key:12s} {len(on)} matrices in {walls[key]:7.1f} s", flush=True)
    return walls, tables


def print_spread(label: str, rel: pd.Series) -> None:
    a = rel.abs()
    print(
        f"  {label:36s} max {a.max():8.2%}  median {a.median():6.2%}  mean signed {rel.mean():+7.2%}  "
        f"over 1%: {(a > 0.01).mean():4.0%}  over 5%: {(a > 0.05).mean():4.0%}  of {len(a)}"
    )


def twin_spread(table: pd.DataFrame) -> pd.Series:
    """|e(fp16) - e(fp32)| / e(fp32) for configs equal but for the group-scale format."""
    t = table.assign(twin=table["config"].str.replace("-fp16-", "-fpXX-").str.replace("-fp32-", "-fpXX-"))
    fp16 = t[t["config"].str.contains("-fp16-")].set_index(["matrix", "twin"])["error"]
    fp32 = t[t["config"].str.contains("-fp32-")].set_index(["matrix", "twin"])["error"]
    return ((fp16 - fp32).abs() / fp32).dropna()


def plan_scores(table: pd.DataFrame, ref: pd.DataFrame, ref1: pd.DataFrame, budgets: tuple[float, ...]) -> list[dict]:
    """Per budget: the plan from `table` against the seed-0 exhaustive plan, under the
    seed-0 errors (the issue's criterion) and under the independent seed-1 errors
    (over the matrices seed 1 covers)."""
    seed0 = ref.set_index(["matrix", "config"])["error"]
    seed1 = ref1.set_index(["matrix", "config"])["error"]
    covered = set(ref1["matrix"])
    out = []
    for budget in budgets:
        mine, exhaustive = solve_ilp(table, budget), solve_ilp(ref, budget)
        row = {
            "budget": budget,
            "same": mine.assignment == exhaustive.assignment,
            "vs_seed0": sum(seed0[k] for k in mine.assignment.items()) / exhaustive.objective - 1,
            "bits": mine.bits_per_param,
            "vs_seed1": None,
        }
        if covered:
            sub = table[table["matrix"].isin(covered)]
            mine1 = solve_ilp(sub, budget).assignment
            exhaustive1 = solve_ilp(ref[ref["matrix"].isin(covered)], budget).assignment
            row["vs_seed1"] = (
                sum(seed1[k] for k in mine1.items()) / sum(seed1[k] for k in exhaustive1.items()) - 1
            )
        out.append(row)
    return out


def _fast_one(item):
    """One matrix in a worker process (as a chunk step), through the pipeline's row function."""
    name, W, rank, fast = item
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    lq = LQSettings(rank=rank)
    (request,) = requests_for({name: W}, {name: [c.name for c in CONFIG_GRID]}, lq, fast)
    rows = as_rows(name, W, request_rows(request, W, lq, None))
    return name, time.perf_counter() - t0, rows


def full_run(args, key: str) -> tuple[float, list[float], pd.DataFrame]:
    mats = all_target_matrices(args.smoke)
    items = [(n, W, args.rank, VARIANTS[key][1]) for n, W in mats.items()]
    t0 = time.perf_counter()
    per, rows = [], []
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for i, (_name, s, r) in enumerate(pool.imap_unordered(_fast_one, items), 1):
            per.append(s)
            rows += r
            if i % 30 == 0 or i == len(items):
                print(
                    f"  {key}, full table: {i}/{len(items)} matrices, {time.perf_counter() - t0:.0f}s",
                    flush=True,
                )
    return time.perf_counter() - t0, per, pd.DataFrame(rows)


def report_full(args) -> None:
    for key in args.full_variants:
        wall, per, table = full_run(args, key)
        print(
            f"{key + ', all 210, ' + str(args.workers) + ' procs':34s} {wall:8.1f} {sum(per) / len(per):8.2f}",
            flush=True,
        )
        table.to_csv(OUT / f"error_table_rank{args.rank}_full_{key}.csv", index=False)
        if key == "default":
            full_confirmation(args, table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--sample-layers", type=int, nargs="+", default=[0, 15])
    ap.add_argument("--noise-layers", type=int, nargs="*", help="reference with seed 1 (default: the sample)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument(
        "--threads", type=int, default=2, help="matrices at a time (one torch thread each), as the pipeline"
    )
    ap.add_argument("--workers", type=int, default=2, help="processes for the full table")
    ap.add_argument("--full", action="store_true", help="also time the full 210-matrix table")
    ap.add_argument("--full-variants", nargs="+", choices=list(VARIANTS), default=["default"])
    ap.add_argument("--full-only", action="store_true", help="skip the sample; time the full table only")
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS), help="budgets of the plans compared")
    add_smoke(ap)
    ap.add_argument("--confirm-margin", type=float, default=PlanSettings().confirm_margin, help="plan confirmation margin")
    ap.add_argument("--confirm-variants", nargs="*", choices=list(VARIANTS), default=["default"])
    ap.add_argument(
        "--confirm-from-saved",
        action="store_true",
        help="only confirm plans, on the sample tables an earlier run saved in bench/out",
    )
    ap.add_argument("--confirm-budget", type=float, default=3.25, help="budget of the full-table confirmation")
    ap.add_argument(
        "--full-confirm-from-saved",
        action="store_true",
        help="only confirm one plan on the full default table an earlier --full run saved in bench/out",
    )
    args = ap.parse_args()
    if args.smoke:  # one layer of the tiny model, one variant, one budget, a 32-config slice of the grid
        args.sample_layers, args.variants, args.budgets = [0], ["default"], [3.25]
    print(stamp(), flush=True)
    OUT.mkdir(exist_ok=True)
    if args.full_confirm_from_saved:
        full_confirmation(args, pd.read_csv(OUT / f"error_table_rank{args.rank}_full_default.csv"))
        return
    if args.full_only:
        report_full(args)
        return
    if args.confirm_from_saved:  # the sample's tables as an earlier run saved them
        tables = {k: pd.read_csv(OUT / f"error_table_rank{args.rank}_{k}.csv") for k in ["ref", *args.confirm_variants]}
        report_confirmations(args, tables, LQSettings(rank=args.rank))
        return
    if args.noise_layers is None:
        args.noise_layers = args.sample_layers
    args.grid = (
        tuple(c for c in CONFIG_GRID if c.B0 == 64 and c.B1 == 64 and c.b1 != "bf16")
        if args.smoke
        else CONFIG_GRID
    )
    settings = LQSettings(rank=args.rank)
    print(f"# rank {args.rank}, {len(args.grid)} configs, sample layers {args.sample_layers}")
    for key in args.variants:
        print(f"#   {key}: {VARIANTS[key][0]}")

    walls, tables = sample_run(args, settings)
    ref, ref1 = tables["ref"], tables["ref_seed1"]
    for key, frame in tables.items() if not args.smoke else ():  # for later analysis (git-ignored)
        frame.to_csv(OUT / f"error_table_rank{args.rank}_{key}.csv", index=False)

    print("\n# per-config (e - e_exhaustive) / e_exhaustive, exhaustive = seed 0")
    rels = {key: relative_differences(tables[key], ref) for key in args.variants}
    for key in args.variants:
        print_spread(key, rels[key])
    if len(ref1):
        rels["seed 1"] = relative_differences(ref1, ref)
        print_spread(f"exhaustive, seed 1 (layers {args.noise_layers})", rels["seed 1"])
    for key in args.variants:
        worst = rels[key].reindex(rels[key].abs().sort_values(ascending=False).index).head(3)
        print(f"  worst of {key}: " + ", ".join(f"{c} {v:+.0%}" for (_, c), v in worst.items()))

    print("\n# resolution: configs equal but for an fp16 vs fp32 scale per B0*B1 weights")
    for key, table in [("exhaustive", ref), *[(k, tables[k]) for k in args.variants]]:
        spread = twin_spread(table)
        print(
            f"  {key:36s} max {spread.max():8.2%}  median {spread.median():6.2%}  "
            f"over 1%: {(spread > 0.01).sum():4d} of {len(spread)}"
        )

    print(
        "\n# ILP plans vs the exhaustive (seed 0) plan: objective under seed-0 errors | under seed-1 errors"
    )
    plans = {key: plan_scores(tables[key], ref, ref1, args.budgets) for key in args.variants}
    if len(ref1):
        plans["seed 1"] = plan_scores(ref1, ref[ref["matrix"].isin(set(ref1["matrix"]))], ref1.iloc[:0], args.budgets)
    for key, scores in plans.items():
        print(f"  {key}:")
        for p in scores:
            fair = f"{p['vs_seed1']:+.3%}" if p["vs_seed1"] is not None else "-"
            print(
                f"    budget {p['budget']:.2f}: same {p['same']!s:5s} {p['vs_seed0']:+.3%} | {fair:>8s}"
                f"   ({p['bits']:.3f} bits/param)"
            )

    confirm_wall = report_confirmations(args, tables, settings)
    for key, (base, _, scores) in confirm_wall.items():
        plans[key], rels[key] = scores, rels[base]

    n = tables["ref"]["matrix"].nunique()
    t_ref = walls["ref"]
    print(
        f"\n{'method':34s} {'wall s':>8s} {'s/matrix':>8s} {'speed-up':>8s} {'max rel':>9s} {'median':>7s} "
        f"{'worst plan':>10s} {'plans ok':>8s} {'fair worst':>10s}"
    )
    print(f"{'exhaustive (seed 0)':34s} {t_ref:8.1f} {t_ref / n:8.2f} {1:8.1f}")
    for key, scores in plans.items():
        if key in confirm_wall:
            base, extra, _ = confirm_wall[key]
            wall = walls[base] + extra
        else:
            wall = walls[key] if key in args.variants else None
        timed = f"{wall:8.1f} {wall / n:8.2f} {t_ref / wall:8.1f}" if wall else " " * 26
        ok = sum(p["same"] or p["vs_seed0"] <= 0.005 for p in scores)
        fair = [p["vs_seed1"] for p in scores if p["vs_seed1"] is not None]
        name = key if wall else f"exhaustive, seed 1 (layers {args.noise_layers})"
        print(
            f"{name:34s} {timed} {rels[key].abs().max():9.1%} {rels[key].abs().median():7.2%} "
            f"{max(p['vs_seed0'] for p in scores):+10.2%} {ok:>5d}/{len(scores)} "
            f"{(f'{max(fair):+10.2%}' if fair else '-'):>10s}"
        )
    if args.full:
        report_full(args)


if __name__ == "__main__":
    main()
