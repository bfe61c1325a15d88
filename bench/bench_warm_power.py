"""What a warm-started fit's power iteration buys: LQ rows with a power iteration in every
fit (the earlier rule) against one in the first `power_fits` only, next to the rows' seed noise.

    python -m bench.bench_warm_power [--layers 0 7 15 29] [--configs 12] [--fisher FILE] [--smoke]

Every LQ iteration after the first fits W - Q starting from the previous iteration's right
basis, so the alternation already runs one step of subspace iteration per LQ iteration; a
power iteration inside each fit doubles its BLAS (four skinny products instead of two).
On real SmolLM2 matrices and a seeded sample of the 432 configs (rank 16, one torch
thread), each cold-start row (`lq_error_estimate`, what the exact rows and anchors run)
is computed four ways: a power iteration in every fit (before), the same with SVD seed 1
(how far two honest runs of one rule differ), in the first 3 fits (`LQSettings.power_fits`,
the default), and in the first fit only. With --fisher (a Fisher-diagonal
safetensors file the pipeline wrote, under artifacts/fisher_diagonals/) the rows are
Fisher-weighted, as the main job's lqlora-fisher table. Prints CPU seconds, iterations,
and the relative row differences against the every-fit row, per bit width: 2-bit rows
are where the first-fit-only rule runs high (their residual keeps moving between iterations).
"""

import argparse
import random
import statistics
import time
from dataclasses import replace

import torch

from bench._common import add_smoke, layer_matrices, stamp
from lqlora_dagster.decompose.lq import LQSettings, lq_error_estimate, prepare
from lqlora_dagster.quant.config import CONFIG_GRID


def fisher_of(path: str | None, names: list[str]) -> dict[str, torch.Tensor | None]:
    if path is None:
        return dict.fromkeys(names)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        return {n: f.get_tensor(n if n in keys else n + ".weight").to(torch.float32) for n in names}


def rows(mats, fishers, configs, settings: LQSettings) -> tuple[list[float], list[int], float]:
    errors, iters, cpu = [], [], 0.0
    for name, W in mats.items():
        data = prepare(W, fishers[name])  # as the table does: the first fit is shared by a matrix's configs
        for c in configs:
            t0 = time.process_time()
            d = lq_error_estimate(data, c, settings)
            cpu += time.process_time() - t0
            errors.append(d.error)
            iters.append(len(d.trace))
    return errors, iters, cpu


def summary(label, errors, base, iters, cpu, base_cpu, bits) -> str:
    rel = [e / b - 1 for e, b in zip(errors, base)]
    share = sum(abs(r) > 0.01 for r in rel) / len(rel)
    per_b = " ".join(
        f"{b}:{statistics.median([r for r, bb in zip(rel, bits) if bb == b]):+.2%}" for b in sorted(set(bits))
    )
    return (
        f"| {label} | {cpu:.1f} ({cpu / base_cpu:.2f}x) | {statistics.median(iters):.0f} | "
        f"{statistics.median(rel):+.3%} | {sum(errors) / sum(base) - 1:+.3%} | {share:.0%} | {per_b} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 7, 15, 29])
    ap.add_argument("--configs", type=int, default=12, help="configs sampled from the 432 (seeded)")
    ap.add_argument("--fisher", help="Fisher diagonals (safetensors) for Fisher-weighted rows")
    ap.add_argument("--rank", type=int, default=16)
    add_smoke(ap)
    args = ap.parse_args()
    if args.smoke:
        args.layers, args.configs, args.fisher, args.rank = [0], 2, None, 4
    torch.set_num_threads(1)
    mats = layer_matrices(args.layers, args.smoke)
    fishers = fisher_of(args.fisher, list(mats))
    configs = random.Random(0).sample(CONFIG_GRID, args.configs)
    old = LQSettings(rank=args.rank)
    old = replace(old, power_fits=old.max_iters)  # a power iteration in every fit
    bits = [c.b for _ in mats for c in configs]
    print(stamp())
    print(f"\n{len(mats)} matrices (layers {args.layers}) x {len(configs)} configs, rank {args.rank}, "
          f"{'Fisher-weighted' if args.fisher else 'unweighted'}, one torch thread\n")
    base, base_iters, base_cpu = rows(mats, fishers, configs, old)
    print("| power iteration in | CPU s | median iters | median row vs every fit | sum of rows | rows > 1% apart "
          "| median row by bits |")
    print("|---|---|---|---|---|---|---|")
    print(summary("every fit (before)", base, base, base_iters, base_cpu, base_cpu, bits), flush=True)
    default = LQSettings().power_fits
    for label, s in (
        ("every fit, SVD seed 1", replace(old, seed=1)),
        (f"the first {default} fits (now)", replace(old, power_fits=default)),
        ("the first fit only", replace(old, power_fits=1)),
    ):
        errors, iters, cpu = rows(mats, fishers, configs, s)
        print(summary(label, errors, base, iters, cpu, base_cpu, bits), flush=True)


if __name__ == "__main__":
    main()
