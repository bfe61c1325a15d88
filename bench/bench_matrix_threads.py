"""Decomposing many matrices: torch threads inside each matrix, or one thread per matrix?

Times the exhaustive rows of one SmolLM2 layer (7 matrices, every --stride-th config)
three ways: one matrix at a time on N torch threads, one at a time on one thread, and
N matrices at a time on one thread each (`one_thread_per_matrix`, what every stage
does). Also checks that the last two give bit-identical errors and that the first does
not (the reason the pipeline pins one thread per matrix).

    python bench/bench_matrix_threads.py
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _real_matrices import layer_matrices  # noqa: E402
from _stamp import stamp  # noqa: E402

from lqlora_dagster.decompose.lq import LQSettings, lq_error_estimate  # noqa: E402
from lqlora_dagster.per_matrix_threads import available_cores, one_thread_per_matrix  # noqa: E402
from lqlora_dagster.quant.config import CONFIG_GRID  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--stride", type=int, default=12, help="every n-th config of the 432 (12: 36 configs)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=available_cores())
    args = ap.parse_args()
    print(stamp(), flush=True)
    mats = layer_matrices([args.layer])
    configs = CONFIG_GRID[:: args.stride]
    settings = LQSettings(rank=args.rank)

    def errors(name: str) -> list[float]:
        return [lq_error_estimate(mats[name], c, settings).error for c in configs]

    def timed(run) -> tuple[float, dict[str, list[float]]]:
        t0 = time.perf_counter()
        result = run()
        return time.perf_counter() - t0, result

    torch.set_num_threads(args.threads)
    runs = {f"1 matrix at a time, {args.threads} torch threads": timed(lambda: {n: errors(n) for n in mats})}
    torch.set_num_threads(1)
    runs["1 matrix at a time, 1 torch thread"] = timed(lambda: {n: errors(n) for n in mats})
    runs[f"{args.threads} matrices at a time, 1 thread each"] = timed(
        lambda: dict(one_thread_per_matrix(errors, list(mats), args.threads))
    )

    single = runs["1 matrix at a time, 1 torch thread"][1]
    print(f"# layer {args.layer}: {len(mats)} matrices x {len(configs)} configs, rank {args.rank}")
    print(f"{'how':44s} {'wall s':>7s} {'configs bit-identical to 1 thread':>34s}")
    for label, (wall, result) in runs.items():
        same = sum(a == b for n in mats for a, b in zip(result[n], single[n]))
        print(f"{label:44s} {wall:7.1f} {same:>27d} of {len(mats) * len(configs)}")


if __name__ == "__main__":
    main()
