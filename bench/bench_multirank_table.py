"""Cost and accuracy of the multi-rank error table against the single-rank one, on real
SmolLM2 matrices, the way the table's chunk steps compute them (one torch thread per
matrix, the full 432-config grid).

- single rank: the fast table at `--rank` (16, today's default);
- multi rank: `--ranks` (default 0 8 16 32 64): the fast table at the base rank (the
  listed rank nearest `--rank`: the single-rank table itself), the other nonzero ranks
  priced on its factors (lower: truncated; higher: one step up per anchor), rank 0 as
  the exact quantization errors. Its time includes the base table's.
Both are timed per matrix on the sampled layers; the whole model's time is the
per-matrix time times 30 layers (every layer has the same seven shapes). Accuracy:
estimate / exact for a few configs per matrix at each rank (exact = the cold-start
decomposition the decomposition stage runs); plans are confirmed with exact rows,
so this says how many rows confirmation will have to compute, not what plans cost.

    python -m bench.bench_multirank_table --layers 0 15 29 --accuracy-layer 15
    python -m bench.bench_multirank_table --smoke     # a layer of the tiny model, ranks up to 24
"""

import argparse
import random
import statistics
import time

import torch

from bench._common import add_smoke, layer_matrices, stamp
from lqlora_dagster.decompose.inits import INITS, quantization_rows
from lqlora_dagster.decompose.lq import LQSettings
from lqlora_dagster.error_estimation.estimates import (
    LOWER_RANK_STEPS,
    FastSettings,
    estimated_errors,
    estimated_errors_by_rank,
)
from lqlora_dagster.pipeline.error_table_refs import base_rank
from lqlora_dagster.quant.config import CONFIG_GRID

N_LAYERS = 30


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--ranks", type=int, nargs="+", default=[0, 8, 16, 32, 64])
    p.add_argument("--accuracy-layer", type=int, default=15)
    p.add_argument("--accuracy-configs", type=int, default=4, help="configs per matrix compared with exact rows")
    p.add_argument("--lower-rank-steps", type=int, default=LOWER_RANK_STEPS,
                   help="alternating steps at each lower rank (the product's default: LOWER_RANK_STEPS)")
    add_smoke(p)
    args = p.parse_args()
    if args.smoke:
        args.layers, args.accuracy_layer, args.accuracy_configs, args.ranks = [0], 0, 2, [0, 8, 16, 24]
    torch.set_num_threads(1)
    print(stamp())
    base = base_rank(tuple(args.ranks), args.rank)  # what the product prices the other ranks on
    others = tuple(r for r in args.ranks if r > 0 and r != base)
    fast = FastSettings()
    mats = layer_matrices(args.layers, args.smoke)
    print(f"\n# {len(mats)} matrices (layers {args.layers}), {len(CONFIG_GRID)} configs, one thread, "
          f"{args.lower_rank_steps} step(s) at each lower rank\n")
    print("| matrix | shape | single rank s | multi rank s | ratio |\n|---|---|---:|---:|---:|")
    single_s, multi_s, estimates = [], [], {}
    for name, W in mats.items():
        _, t1 = timed(estimated_errors, W, CONFIG_GRID, LQSettings(rank=args.rank), None, fast)
        by_rank, t2 = timed(estimated_errors_by_rank, W, CONFIG_GRID, LQSettings(rank=base), None, fast, others,
                            args.lower_rank_steps)
        if 0 in args.ranks:
            rows0, t3 = timed(quantization_rows, W, CONFIG_GRID)
            by_rank[0] = rows0
            t2 += t3
        estimates[name] = by_rank
        single_s.append(t1)
        multi_s.append(t2)
        print(f"| {name} | {tuple(W.shape)} | {t1:.1f} | {t2:.1f} | {t2 / t1:.2f} |", flush=True)
    per_layer = len(mats) / len(args.layers)
    print(f"\nsingle-rank table: {sum(single_s):.0f} s for {len(mats)} matrices, whole model (x{N_LAYERS} layers / "
          f"{len(args.layers)} sampled) {sum(single_s) / len(mats) * per_layer * N_LAYERS / 60:.1f} min on one core")
    print(f"multi-rank table:  {sum(multi_s):.0f} s, whole model {sum(multi_s) / len(mats) * per_layer * N_LAYERS / 60:.1f}"
          f" min on one core; ratio {sum(multi_s) / sum(single_s):.2f}x")

    print(f"\n# estimate / exact, layer {args.accuracy_layer}, {args.accuracy_configs} configs per matrix\n")
    print("| rank | n | median | min | max | estimates below exact |\n|---:|---:|---:|---:|---:|---:|")
    sample = tuple(random.Random(0).sample(CONFIG_GRID, args.accuracy_configs))
    index = {c: i for i, c in enumerate(CONFIG_GRID)}
    prefix = f"model.layers.{args.accuracy_layer}."
    for rank in sorted(r for r in args.ranks if r > 0):
        ratios = []
        for name, W in mats.items():
            if not name.startswith(prefix):
                continue
            exact = INITS["lq"].exact_errors_at(W, sample, rank, LQSettings(rank=rank))
            ratios += [estimates[name][rank][index[e.config]].error / e.error for e in exact]
        print(f"| {rank} | {len(ratios)} | {statistics.median(ratios):.3f} | {min(ratios):.3f} | {max(ratios):.3f} | "
              f"{sum(r < 1 for r in ratios)} |", flush=True)


if __name__ == "__main__":
    main()
