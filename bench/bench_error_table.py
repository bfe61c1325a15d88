"""Error-table benchmark: the fast path against the exhaustive reference on real SmolLM2.

    python bench/bench_error_table.py [--rank 16] [--sample-layers 0 15] [--workers 2]
                                      [--full] [--reference lut|exact]

1. Sample (two whole layers, 14 matrices, all 432 configs): the exhaustive reference (one
   cold-start LQ decomposition per config) and the fast path, timed on the same matrices;
   every config's relative error difference; ILP plans over the sample at six budgets
   from each table, compared by assignment and by objective under the exhaustive errors.
2. With --full: the fast table for all 210 target matrices, fanned out over --workers
   processes of one torch thread each (what the pipeline's chunks do).

The reference's quantizer is selectable: "exact" (bit-packed codes, what the pipeline's
exhaustive path runs) or "lut" (the table-based quantizer, same errors to ~1e-6, faster);
the speed-up column always compares against what was run. Prints one table at the end.
"""

import argparse
import multiprocessing as mp
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from lqlora_dagster.allocate.ilp import solve_ilp
from lqlora_dagster.decompose.lq import LQSettings, lq_decompose, lq_error_estimate
from lqlora_dagster.error_table import ConfigError
from lqlora_dagster.fast_error_table import FastSettings, fast_errors
from lqlora_dagster.methods import get_method
from lqlora_dagster.quant.config import CONFIG_GRID, storage_bits

try:
    from _real_matrices import all_target_matrices, layer_matrices
except ImportError:  # run as a module from the repo root
    from bench._real_matrices import all_target_matrices, layer_matrices

BUDGETS = (2.5, 2.75, 3.0, 3.25, 3.5, 4.0)
LQ = get_method("lqlora")


def reference_errors(
    W: torch.Tensor, settings: LQSettings, quantizer: str, grid=CONFIG_GRID
) -> list[ConfigError]:
    decompose = lq_decompose if quantizer == "exact" else lq_error_estimate
    out = []
    for c in grid:
        t0 = time.perf_counter()
        d = decompose(W, c, settings)
        out.append(ConfigError(c, d.error, len(d.trace), time.perf_counter() - t0))
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


def plan_agreement(fast: pd.DataFrame, ref: pd.DataFrame) -> list[dict]:
    """Per budget: same assignment? objective of the fast plan under exhaustive errors
    relative to the exhaustive plan's objective."""
    truth = ref.set_index(["matrix", "config"])["error"]
    out = []
    for budget in BUDGETS:
        p_ref, p_fast = solve_ilp(ref, budget), solve_ilp(fast, budget)
        obj_fast = sum(truth[(m, c)] for m, c in p_fast.assignment.items())
        out.append(
            {
                "budget": budget,
                "same": p_fast.assignment == p_ref.assignment,
                "rel_obj": obj_fast / p_ref.objective - 1,
                "bits": p_fast.bits_per_param,
            }
        )
    return out


def sample_run(args, settings: LQSettings) -> tuple[list[dict], dict[str, pd.DataFrame]]:
    """Fast and reference tables over the sample; on the noise layers also the reference
    with another SVD seed (how far two honest runs of the reference differ)."""
    torch.set_num_threads(args.threads)
    mats = layer_matrices(args.sample_layers)
    rows: dict[str, list[dict]] = {"fast": [], "ref": [], "ref_seed1": []}
    timing = []
    for name, W in mats.items():
        t0 = time.perf_counter()
        fast = fast_errors(W, args.grid, LQ, settings, fast=FastSettings(refine_steps=args.refine))
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = reference_errors(W, settings, args.reference, args.grid)
        t_ref = time.perf_counter() - t0
        rows["fast"] += as_rows(name, W, fast)
        rows["ref"] += as_rows(name, W, ref)
        if int(name.split(".")[2]) in args.noise_layers:
            rows["ref_seed1"] += as_rows(
                name, W, reference_errors(W, replace(settings, seed=1), args.reference, args.grid)
            )
        rel = max(abs(f.error - r.error) / r.error for f, r in zip(fast, ref))
        timing.append({"matrix": name, "fast_s": t_fast, "ref_s": t_ref, "max_rel": rel})
        print(f"{name:40s} fast {t_fast:6.2f}s  ref {t_ref:7.2f}s  max rel diff {rel:7.3%}", flush=True)
    return timing, {k: pd.DataFrame(v) for k, v in rows.items()}


def compare(label: str, table: pd.DataFrame, ref: pd.DataFrame) -> pd.Series:
    """Per-config relative differences of `table` against `ref` (same matrices)."""
    merged = table.merge(ref, on=["matrix", "config"], suffixes=("", "_ref"))
    rel = (merged["error"] - merged["error_ref"]).abs() / merged["error_ref"]
    print(
        f"  {label:34s} max {rel.max():8.2%}  median {rel.median():6.2%}  "
        f"over 1%: {(rel > 0.01).sum():4d}  over 5%: {(rel > 0.05).sum():4d}  of {len(rel)}"
    )
    return rel


def _fast_one(item):
    name, W, rank, refine = item
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    fast_errors(W, CONFIG_GRID, LQ, LQSettings(rank=rank), fast=FastSettings(refine_steps=refine))
    return name, time.perf_counter() - t0


def full_run(args) -> tuple[float, list[float]]:
    mats = all_target_matrices()
    items = [(n, W, args.rank, args.refine) for n, W in mats.items()]
    t0 = time.perf_counter()
    per = []
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for i, (_name, s) in enumerate(pool.imap_unordered(_fast_one, items), 1):
            per.append(s)
            if i % 10 == 0 or i == len(items):
                print(f"  full table: {i}/{len(items)} matrices, {time.perf_counter() - t0:.0f}s", flush=True)
    return time.perf_counter() - t0, per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--sample-layers", type=int, nargs="+", default=[0, 15])
    ap.add_argument(
        "--noise-layers", type=int, nargs="*", default=[0], help="also run the reference with seed 1"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the sample comparison")
    ap.add_argument("--workers", type=int, default=2, help="processes for the full table")
    ap.add_argument("--reference", choices=["lut", "exact"], default="lut")
    ap.add_argument("--refine", type=int, default=0, help="fast path: alternating steps per sibling config")
    ap.add_argument("--full", action="store_true", help="also time the full 210-matrix table")
    ap.add_argument("--smoke", action="store_true", help="a 32-config slice of the grid (checks the script)")
    args = ap.parse_args()
    args.grid = (
        tuple(c for c in CONFIG_GRID if c.B0 == 64 and c.B1 == 64 and c.b1 != "bf16")
        if args.smoke
        else CONFIG_GRID
    )
    settings = LQSettings(rank=args.rank)
    print(
        f"# rank {args.rank}, {len(args.grid)} configs, sample layers {args.sample_layers}, "
        f"reference quantizer {args.reference}"
    )

    timing, tables = sample_run(args, settings)
    fast, ref, ref1 = tables["fast"], tables["ref"], tables["ref_seed1"]
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    for key, frame in tables.items():  # kept for later analysis (bench/out is git-ignored)
        frame.to_csv(out / f"error_table_rank{args.rank}_{key}.csv", index=False)
    t_fast = sum(t["fast_s"] for t in timing)
    t_ref = sum(t["ref_s"] for t in timing)
    print("\n# per-config relative error difference against the exhaustive reference (seed 0)")
    rel = compare("fast, whole sample", fast, ref)
    noise = ref1["matrix"].unique()
    if len(noise):
        compare(f"fast, layers {args.noise_layers}", fast[fast["matrix"].isin(noise)], ref)
        compare(f"reference seed 1, layers {args.noise_layers}", ref1, ref)
    worst = fast.merge(ref, on=["matrix", "config"], suffixes=("", "_ref"))
    worst["rel"] = (worst["error"] - worst["error_ref"]).abs() / worst["error_ref"]
    print(
        worst.sort_values("rel", ascending=False).head(5)[["matrix", "config", "rel"]].to_string(index=False)
    )

    print("\n# ILP plans, fast table vs exhaustive table (objective under the exhaustive errors)")
    plans = plan_agreement(fast, ref)
    for p in plans:
        print(
            f"  budget {p['budget']:.2f}: same assignment {p['same']!s:5s}  "
            f"objective {p['rel_obj']:+.3%}, {p['bits']:.3f} bits/param"
        )
    if len(noise):
        print(f"# the same for the seed-1 reference over layers {args.noise_layers} (noise floor)")
        for p in plan_agreement(ref1, ref[ref["matrix"].isin(noise)]):
            print(
                f"  budget {p['budget']:.2f}: same assignment {p['same']!s:5s}  objective {p['rel_obj']:+.3%}"
            )

    n = len(timing)
    agree = sum(p["same"] or p["rel_obj"] <= 0.005 for p in plans)
    print(
        f"\n{'method':24s} {'wall s':>9s} {'s/matrix':>9s} {'speed-up':>9s} {'max rel err':>12s} {'plans ok':>9s}"
    )
    print(
        f"{'exhaustive (' + args.reference + ')':24s} {t_ref:9.1f} {t_ref / n:9.2f} {1:9.1f} {0:12.3%} {'-':>9s}"
    )
    print(
        f"{'fast':24s} {t_fast:9.1f} {t_fast / n:9.2f} {t_ref / t_fast:9.1f} {rel.max():12.3%} "
        f"{agree:>4d}/{len(plans)}"
    )
    if args.full:
        wall, per = full_run(args)
        print(
            f"{'fast, all 210, ' + str(args.workers) + ' procs':24s} {wall:9.1f} {sum(per) / len(per):9.2f} "
            f"{'':>9s} {'':>12s} {'':>9s}"
        )


if __name__ == "__main__":
    main()
