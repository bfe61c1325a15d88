"""The error table's two costs per matrix shape, this code against another checkout, side by side.

    python -m bench.bench_shape_cost --checkout /path/to/old/worktree
        [--table-shapes 512x2048 2048x2048] [--iter-shapes 512x2048 2048x2048 8192x2048 2048x8192]
    python -m bench.bench_shape_cost --smoke     # 64 x 64, this code against itself

On one torch thread, in one fresh process per (code, shape): the fast table's rows of one
matrix (all 432 configs, rank 16, Fisher-weighted), and the CPU seconds per LQ iteration
of a cold start (`lq_error_trace`, a fixed number of iterations: what an exact row costs
per iteration). The weights are N(0, 0.02) and the Fisher diagonal uniform squared, from
fixed seeds: honest for time, not for errors. It runs older commits too (their modules
are found under the names they had), which is what the Llama-3.2-1B extrapolation in
bench/results/stage_cpu.md needs: its shapes are too large to run its whole table twice.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "nf3-b03-bf16-B016-B164"


def child(rows: int, cols: int, what: str, iters: int) -> dict:
    import time

    import torch

    try:
        from lqlora_dagster.error_estimation.estimates import estimated_errors
    except ImportError:  # before the error table's modules were renamed
        from lqlora_dagster.error_table.estimates import estimated_errors
    from lqlora_dagster.decompose.lq import LQSettings, lq_error_trace
    from lqlora_dagster.quant.config import CONFIG_GRID, QuantConfig

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(rows, cols, generator=g) * 0.02
    F = torch.rand(rows, cols, generator=g) ** 2
    s = LQSettings(rank=16)
    lq_error_trace(W[:64, :64].contiguous(), QuantConfig.parse(CONFIG), 1, s, F[:64, :64].contiguous())  # warm-up, kernels
    start = time.process_time()
    if what == "table":
        estimated_errors(W, CONFIG_GRID, s, F)
        return {"seconds": time.process_time() - start}
    lq_error_trace(W, QuantConfig.parse(CONFIG), iters, s, F)
    return {"seconds_per_iter": (time.process_time() - start) / iters}


def measure(checkout: Path, shape: str, what: str, iters: int) -> dict:
    rows, cols = (int(v) for v in shape.split("x"))
    env = dict(os.environ, PYTHONPATH=str(checkout))  # the child imports only the measured package
    done = subprocess.run([sys.executable, __file__, "--child", str(rows), str(cols), what, str(iters)],
                          cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkout", type=Path, help="the other code (a git worktree)")
    p.add_argument("--table-shapes", nargs="*", default=["512x2048", "2048x2048"])
    p.add_argument("--iter-shapes", nargs="*", default=["512x2048", "2048x2048", "8192x2048", "2048x8192"])
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="64 x 64 against this same code: checks the script")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), int(args.child[1]), args.child[2], int(args.child[3]))))
        return
    from bench._common import stamp  # the parent only: children import nothing but the measured code

    if args.smoke:
        args.checkout, args.table_shapes, args.iter_shapes, args.iters = REPO, ["64x64"], ["64x64"], 2
    if args.checkout is None:
        p.error("--checkout is required")
    other = args.checkout.resolve()
    commit = subprocess.run(["git", "-C", str(other), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(stamp())
    print(f"- other code: {other} at {commit}\n")
    print("| shape | what | other code | this code | this / other |\n|---|---|---|---|---|")
    for what, shapes, key in (("table", args.table_shapes, "seconds"), ("iter", args.iter_shapes, "seconds_per_iter")):
        for shape in shapes:
            old = measure(other, shape, what, args.iters)[key]
            new = measure(REPO, shape, what, args.iters)[key]
            label = "fast table, 432 configs (CPU s)" if what == "table" else "one LQ iteration (CPU s)"
            print(f"| {shape} | {label} | {old:.3f} | {new:.3f} | {new / old:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
