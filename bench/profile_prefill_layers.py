"""Where a compressed model's prefill time goes, layer by layer: one LQ layer's no-grad
forward on 256 tokens against fp32's matmul, split into decoding the packed weight, the
matmul on the decoded buffer and the low-rank part, on SmolLM2-135M's four target shapes,
summed over its 210 layers. Also times the alternative of folding the factors into the
decoded weight before one matmul. Each figure is the lower quartile of 30 calls.

    python -m bench.profile_prefill_layers [--threads 1 2] [--config nf3-b03-bf16-B016-B164]
    python -m bench.profile_prefill_layers --smoke    # the tiny model's 14 layers, 16 tokens, 1 thread"""

import argparse
import time

import torch
from torch.nn import functional as F

from bench._common import TINY_SHAPES, add_smoke
from lqlora_dagster.quant import fast_decode
from lqlora_dagster.quant.config import QuantConfig
from lqlora_dagster.quant.matrix import QuantizedMatrix
from lqlora_dagster.surgery.lq_linear import LQLinear

SMOLLM2_SHAPES = ((576, 576, 60), (192, 576, 60), (1536, 576, 60), (576, 1536, 30))  # (out, in, layers)
TINY_LAYERS = tuple((*TINY_SHAPES[k], 2) for k in TINY_SHAPES)  # two blocks of the tiny model


def lower_quartile_ms(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[calls // 4] * 1e3


def layer_times(out_f: int, in_f: int, config: QuantConfig, tokens: int, calls: int = 30) -> dict[str, float]:
    W = torch.randn(out_f, in_f) * 0.02
    layer = LQLinear(QuantizedMatrix.quantize(W, config), torch.randn(out_f, 16) * 0.01, torch.randn(16, in_f) * 0.01)
    x = torch.randn(1, tokens, in_f)
    args = fast_decode.kernel_args(layer.quantized())
    L1, L2 = layer.L1.detach(), layer.L2.detach()
    with torch.no_grad():
        return {
            "fp32 matmul": lower_quartile_ms(lambda: F.linear(x, W), calls),
            "LQ layer": lower_quartile_ms(lambda: layer(x), calls),
            "decode": lower_quartile_ms(lambda: fast_decode.dequantize_scratch(args), calls),
            "decode + matmul": lower_quartile_ms(lambda: F.linear(x, fast_decode.dequantize_scratch(args)), calls),
            "low rank": lower_quartile_ms(lambda: (x.reshape(-1, in_f) @ L2.T) @ L1.T, calls),
            "folded": lower_quartile_ms(lambda: F.linear(x, fast_decode.dequantize_scratch(args).addmm_(L1, L2)), calls),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--config", default="nf3-b03-bf16-B016-B164")
    p.add_argument("--tokens", type=int, default=256)
    add_smoke(p)
    args = p.parse_args()
    shapes, calls = SMOLLM2_SHAPES, 30
    if args.smoke:
        shapes, calls, args.threads, args.tokens = TINY_LAYERS, 3, [1], 16
    if fast_decode.kernel() is None:
        raise SystemExit("the compiled decoder is not available here: nothing to profile")
    config = QuantConfig.parse(args.config)
    for threads in args.threads:
        torch.set_num_threads(threads)
        totals: dict[str, float] = {}
        for out_f, in_f, layers in shapes:
            for name, ms in layer_times(out_f, in_f, config, args.tokens, calls).items():
                totals[name] = totals.get(name, 0.0) + ms * layers
        print(f"{threads} thread(s), {args.config}, {args.tokens} tokens, ms summed over {sum(n for *_, n in shapes)} layers: "
              + ", ".join(f"{k} {v:,.0f}" for k, v in totals.items()), flush=True)


if __name__ == "__main__":
    main()
