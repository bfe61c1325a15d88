"""How reproducible is the exhaustive error table itself? Reruns it on the sample with
changes that leave the algorithm alone (torch thread count; SVD seed) and compares
with the seed-0 reference `bench_error_table.py` saved in bench/out (computed one torch
thread per matrix, as the pipeline does; before 2026-11-25 late evening, on 2 threads).

Why: issue 5 asks every fast config to be within 1 % of the exhaustive value. The LQ
loop keeps the best of a few iterates and stops on a 0.1 % improvement test, so which
iterate it ends on depends on rounding. This bench measures how far the reference moves
when only the BLAS reduction order changes, i.e. the noise floor of that criterion.

    python bench/bench_reference_noise.py --threads 2   # reads bench/out/error_table_rank16_ref.csv
"""

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))

from _real_matrices import layer_matrices  # noqa: E402
from _rows import as_rows  # noqa: E402  (bench scripts run from the repo root)
from _stamp import stamp  # noqa: E402
from bench_error_table import BUDGETS, OUT, relative_differences  # noqa: E402

from lqlora_dagster.allocate.ilp import solve_ilp  # noqa: E402
from lqlora_dagster.decompose.inits import INITS  # noqa: E402
from lqlora_dagster.decompose.lq import LQSettings  # noqa: E402
from lqlora_dagster.quant.config import CONFIG_GRID  # noqa: E402


def _rerun(item: tuple[str, torch.Tensor, int, int, int]) -> list[dict]:
    name, W, rank, seed, threads = item
    torch.set_num_threads(threads)
    return as_rows(name, W, INITS["lq"].exact_errors(W, CONFIG_GRID, LQSettings(rank=rank, seed=seed)))


def rerun(mats: dict[str, torch.Tensor], rank: int, seed: int, threads: int, workers: int) -> pd.DataFrame:
    """The exhaustive table of `mats`, `workers` processes of `threads` torch threads each."""
    items = [(n, W, rank, seed, threads) for n, W in mats.items()]
    rows, t0 = [], time.perf_counter()
    with mp.get_context("spawn").Pool(workers) as pool:
        for i, r in enumerate(pool.imap_unordered(_rerun, items), 1):
            rows += r
            print(f"  seed {seed}, {threads} thread(s): {i}/{len(items)} matrices, {time.perf_counter() - t0:.0f}s", flush=True)
    return pd.DataFrame(rows)


def plan_gap(table: pd.DataFrame, ref: pd.DataFrame, budget: float) -> float:
    """Objective of `table`'s plan under `ref`'s errors, relative to `ref`'s own plan."""
    errors = ref.set_index(["matrix", "config"])["error"]
    mine = solve_ilp(table, budget).assignment
    return sum(errors[k] for k in mine.items()) / solve_ilp(ref, budget).objective - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--sample-layers", type=int, nargs="+", default=[0, 15])
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the rerun (the reference used 1)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    print(stamp(), flush=True)
    saved = OUT / f"error_table_rank{args.rank}_ref.csv"
    if not saved.exists():
        sys.exit(f"{saved} is missing: run bench/bench_error_table.py --rank {args.rank} first")
    ref = pd.read_csv(saved)
    mats = {n: W for n, W in layer_matrices(args.sample_layers).items() if n in set(ref["matrix"])}
    if len(mats) != ref["matrix"].nunique():
        sys.exit(f"{saved} holds other matrices than layers {args.sample_layers}")

    reruns = {f"seed 0, {args.threads} thread(s)": rerun(mats, args.rank, 0, args.threads, args.workers)}
    reruns[f"seed 0, {args.threads} thread(s)"].to_csv(
        OUT / f"error_table_rank{args.rank}_ref_threads{args.threads}.csv", index=False
    )
    seed1 = OUT / f"error_table_rank{args.rank}_ref_seed1.csv"
    if seed1.exists():
        reruns["seed 1 (saved)"] = pd.read_csv(seed1)

    print(f"\n# exhaustive reruns vs the saved exhaustive table (seed 0), rank {args.rank}")
    print(f"{'rerun':28s} {'configs':>7s} {'identical':>9s} {'>1% off':>8s} {'median':>7s} {'max':>8s} {'worst plan':>10s} {'plans within 0.5%':>17s}")
    for label, table in reruns.items():
        rel = relative_differences(table, ref).abs()
        sub = ref[ref["matrix"].isin(set(table["matrix"]))]
        gaps = [plan_gap(table, sub, b) for b in BUDGETS]
        print(
            f"{label:28s} {len(rel):7d} {(rel == 0).mean():9.0%} {(rel > 0.01).mean():8.0%} {rel.median():7.2%} "
            f"{rel.max():8.1%} {max(gaps):+10.2%} {sum(g <= 0.005 for g in gaps):>15d}/{len(gaps)}"
        )


if __name__ == "__main__":
    main()
