"""What the error table costs as matrices grow, and what that makes a 7B or 70B model cost.

Times the product's fast error-table rows (`error_table.estimates.estimated_errors`, all
432 configs of the grid, rank 16, no Fisher) for one matrix of each shape on one torch
thread (or one GPU with `--device cuda`), fits seconds = c * numel^k and
seconds = a + b * numel (relative least squares), and sums the closer fit over the target
matrices of SmolLM2-135M, Llama-3.2-1B, Llama-2-7B and Llama-2-70B. The weights are
N(0, 0.02) from a fixed seed: honest for time (the work does not depend on the values),
not for the errors.

    python -m bench.bench_scale [--shapes 576x576 2048x2048 ...] [--workers 2] [--device cuda]
    python -m bench.bench_scale --smoke      # the tiny model's shapes: 32x64, 64x64, 128x64

What is measured: the per-matrix seconds printed first. What is extrapolated: the model
totals (one process per core, matrices spread over `--workers` cores)."""

import argparse
import math
import time

import torch

from bench._common import add_smoke, stamp

# (rows, cols, count per layer) of every target kind, and the number of layers
MODELS = {
    "SmolLM2-135M": (30, [(576, 576, 2), (192, 576, 2), (1536, 576, 2), (576, 1536, 1)]),
    "Llama-3.2-1B": (16, [(2048, 2048, 2), (512, 2048, 2), (8192, 2048, 2), (2048, 8192, 1)]),
    "Llama-2-7B": (32, [(4096, 4096, 4), (11008, 4096, 2), (4096, 11008, 1)]),
    "Llama-2-70B": (80, [(8192, 8192, 2), (1024, 8192, 2), (28672, 8192, 2), (8192, 28672, 1)]),
}
DEFAULT_SHAPES = ["192x576", "576x576", "1536x576", "512x2048", "2048x2048", "8192x2048"]


def time_rows(rows: int, cols: int, device: torch.device) -> float:
    from lqlora_dagster.decompose.lq import LQSettings
    from lqlora_dagster.error_estimation.estimates import FastSettings, estimated_errors
    from lqlora_dagster.quant.config import CONFIG_GRID

    W = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    estimated_errors(W, CONFIG_GRID, LQSettings(rank=16), None, FastSettings())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES)
    p.add_argument("--workers", type=int, default=2,
                   help="cores (or GPUs) the extrapolated table spreads over")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: the rows on one GPU")
    p.add_argument("--seconds", type=float, nargs="+", default=None,
                   help="seconds already measured for --shapes (refits without timing again)")
    add_smoke(p)
    args = p.parse_args()
    if args.smoke:
        args.shapes = ["32x64", "64x64", "128x64"]
    device = torch.device(args.device)
    torch.set_num_threads(1)
    print(stamp())
    measuring = device.type == "cuda" and not args.seconds
    where = torch.cuda.get_device_name(device) if measuring else args.device if args.seconds else "one thread"
    print(f"\n## Measured: fast error-table rows of one matrix (432 configs, rank 16, {where})\n")
    if measuring:
        time_rows(192, 576, device)  # CUDA context, kernels and cuSOLVER handles, outside the timings
    elif not args.seconds:
        time_rows(64, 64, device)  # the compiled LQ steps' library and the level tables load here, not in a timing
    print("| shape | weights | seconds | µs per weight |\n|---|---|---|---|")
    sizes, seconds = [], []
    for i, shape in enumerate(args.shapes):
        rows, cols = (int(v) for v in shape.split("x"))
        s = args.seconds[i] if args.seconds else time_rows(rows, cols, device)
        sizes.append(rows * cols)
        seconds.append(s)
        print(f"| {rows} x {cols} | {rows * cols:,} | {s:.2f} | {1e6 * s / (rows * cols):.3f} |", flush=True)
    # two models of seconds per matrix, each fitted so every size weighs the same: a power
    # law (per-weight cost grows with size on a CPU: bigger SVDs, matrices out of cache)
    # and a fixed cost plus a per-weight one (a GPU: launches and small SVDs dominate
    # small matrices); the one that misses the points least extrapolates
    n, t = torch.tensor(sizes, dtype=torch.float64), torch.tensor(seconds, dtype=torch.float64)
    A = torch.stack([torch.ones_like(n), n.log()], dim=1)
    log_c, k = torch.linalg.lstsq(A, t.log()[:, None]).solution[:, 0].tolist()
    fixed, per = torch.linalg.lstsq(torch.stack([1 / t, n / t], dim=1), torch.ones_like(t)[:, None]).solution[:, 0].tolist()
    fits = {
        f"seconds = {math.exp(log_c):.3e} x weights^{k:.3f}": lambda w: math.exp(log_c) * w**k,
        f"seconds = {fixed:.3g} + {per:.3e} x weights": lambda w: fixed + per * w,
    }
    misses = {name: max(abs(f(w) / s - 1) for w, s in zip(sizes, seconds)) for name, f in fits.items()}
    for name, miss in misses.items():
        print(f"\nfit: {name} (largest relative miss on the points: {miss:.0%})")
    # a fit whose cost falls as matrices grow (timing noise on small ones) cannot extrapolate
    sensible = [name for name, f in fits.items() if f(2 * max(sizes)) > f(max(sizes)) > 0] or list(fits)
    best = min(sensible, key=misses.get)
    model = fits[best]
    print(f"\nextrapolating with: {best}")
    unit = "GPUs" if device.type == "cuda" else "CPU cores"
    print(f"\n## Extrapolated: one error table on {args.workers} {unit}\n")
    print("| model | target matrices | target weights | hours |\n|---|---|---|---|")
    for name, (layers, kinds) in MODELS.items():
        matrices = sum(count for _, _, count in kinds) * layers
        weights = layers * sum(r * n * count for r, n, count in kinds)
        total = layers * sum(count * model(r * n) for r, n, count in kinds)
        print(f"| {name} | {matrices} | {weights / 1e9:.2f}B | {total / 3600 / args.workers:.2f} |")


if __name__ == "__main__":
    main()
