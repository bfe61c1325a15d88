"""Perplexity of SmolLM2-135M at NF4 (QLoRA's config, 4.127 bits) after each init, against
the fp32 reference, on held-out State-of-the-Union text (2016+).

    python -m bench.bench_nf4_quality [--windows 16] [--seq-len 512] [--ranks 16 64] [--smoke]

Rows: QLoRA (quantize only), LQ init at each rank, Fisher-weighted LQ init at each rank
(Fisher from 32 x 256-token calibration sequences of the 1946-1999 speeches). --smoke
measures the tiny Llama built in code with its word-level tokenizer: 2 windows of 32
tokens, Fisher from 2 sequences, rank 8.
"""

import argparse
import copy
import time

from bench._common import add_smoke, smollm2_folder, stamp, tiny_llama, tiny_tokenizer
from lqlora_dagster.data.corpora import sotu_text
from lqlora_dagster.data.windows import token_windows, tokenize
from lqlora_dagster.decompose.lq import LQSettings
from lqlora_dagster.fisher import estimate_fisher
from lqlora_dagster.methods import get_method
from lqlora_dagster.metrics import perplexity, storage
from lqlora_dagster.models.loading import load_model, load_tokenizer
from lqlora_dagster.models.targets import find_targets
from lqlora_dagster.quant import QLORA_NF4
from lqlora_dagster.surgery.decompose_model import apply_decompositions, decompose_targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    add_smoke(ap)
    args = ap.parse_args()
    print(stamp(), flush=True)
    calibration_len, calibration_sequences = 256, 32
    if args.smoke:
        model, tokenizer = tiny_llama(), tiny_tokenizer()
        args.windows, args.seq_len, args.ranks = 2, 32, [8]
        calibration_len, calibration_sequences = 32, 2
    else:
        folder = smollm2_folder()
        model, tokenizer = load_model(folder), load_tokenizer(folder)
    windows = token_windows(tokenize(tokenizer, sotu_text("eval")), args.seq_len, args.windows)
    calibration = token_windows(tokenize(tokenizer, sotu_text("calibration")), calibration_len,
                                calibration_sequences, seed=0)
    targets = find_targets(model)
    plan = {t.name: QLORA_NF4 for t in targets}

    t0 = time.perf_counter()
    reference = perplexity(model, windows)
    print(f"{'init':22s} {'rank':>4s} {'ppl':>7s} {'vs fp32':>8s} {'bits':>6s} {'+low rank':>9s} {'s':>6s}")
    print(
        f"{'fp32 reference':22s} {'':>4s} {reference:7.2f} {'':>8s} {'':>6s} {'':>9s} {time.perf_counter() - t0:6.0f}"
    )
    fisher = estimate_fisher(model, calibration, targets)
    runs = [("qlora", 16)] + [(m, r) for r in args.ranks for m in ("lqlora", "lqlora-fisher")]
    for method, rank in runs:
        t0 = time.perf_counter()
        lq = copy.deepcopy(model)
        m = get_method(method)
        decs = decompose_targets(lq, targets, plan, m, LQSettings(rank=rank), fisher if m.fisher else None)
        apply_decompositions(lq, decs)
        ppl = perplexity(lq, windows)
        st = storage(lq)
        print(
            f"{method:22s} {rank:4d} {ppl:7.2f} {ppl / reference - 1:+8.1%} {st.bits_per_param:6.3f} "
            f"{st.bits_incl_lowrank:9.3f} {time.perf_counter() - t0:6.0f}",
            flush=True,
        )
        del lq, decs


if __name__ == "__main__":
    main()
