"""Method-core benchmark: LQ decomposition time (randomized vs full SVD) on the seven
SmolLM2 matrix shapes, and NF4 quantize+dequantize throughput next to torchao's NF4.

    python bench/bench_method.py [--rank 64] [--threads 2]

torchao is optional (pip install torchao); without it that column reads "n/a".
"""

import argparse
import time

import torch

from lqlora_dagster.decompose.lq import LQSettings, lq_decompose
from lqlora_dagster.quant import QLORA_NF3, QLORA_NF4, QuantizedMatrix

try:
    from _real_matrices import layer_matrices
    from _stamp import stamp
except ImportError:  # run as a module from the repo root
    from bench._real_matrices import layer_matrices
    from bench._stamp import stamp


def timed(fn, repeat: int = 3) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def torchao_nf4():
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:
        return None
    return to_nf4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(stamp(), flush=True)
    torch.set_num_threads(args.threads)
    mats = layer_matrices([10])
    to_nf4 = torchao_nf4()

    print(f"# LQ decomposition, NF3 (3,8,fp32,64,256), rank {args.rank}, {args.threads} threads, layer 10")
    print(
        f"{'matrix':10s} {'shape':>10s} | {'rand s':>7s} {'iters':>5s} {'err':>9s} | {'full s':>7s} {'iters':>5s} {'err':>9s}"
    )
    for name, W in mats.items():
        row = []
        for svd in ("randomized", "full"):
            start = time.perf_counter()
            d = lq_decompose(W, QLORA_NF3, LQSettings(rank=args.rank, svd=svd))
            row.append((time.perf_counter() - start, len(d.trace), d.error))
        shape = f"{W.shape[0]}x{W.shape[1]}"
        (rs, ri, re), (fs, fi, fe) = row
        print(
            f"{name.split('.')[-1]:10s} {shape:>10s} | {rs:7.3f} {ri:5d} {re:9.2f} | {fs:7.3f} {fi:5d} {fe:9.2f}"
        )

    print("\n# NF4 quantize + dequantize, QLoRA config (4,8,fp32,64,256); Mweights/s, best of 3")
    print(f"{'matrix':10s} {'shape':>10s} | {'ours':>8s} {'quant only':>9s} | {'torchao':>8s}")
    for name, W in mats.items():
        n = W.numel() / 1e6
        ours = n / timed(lambda W=W: QuantizedMatrix.quantize(W, QLORA_NF4).dequantize())
        if to_nf4 is None:
            ao = "n/a"
        else:
            Wb = W.to(torch.bfloat16)
            try:
                ao = f"{n / timed(lambda Wb=Wb: to_nf4(Wb, 64, 256).get_original_weight()):8.1f}"
            except AssertionError:
                ao = "rejects"  # torchao needs numel/64 divisible by 256
        enc = n / timed(lambda W=W: QuantizedMatrix.quantize(W, QLORA_NF4))
        print(
            f"{name.split('.')[-1]:10s} {W.shape[0]:>4d}x{W.shape[1]:<5d} | {ours:8.1f} {enc:9.1f} | {ao:>8s}"
        )


if __name__ == "__main__":
    main()
