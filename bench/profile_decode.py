"""Where each millisecond of a decoded token goes, and what bounds it.

    python -m bench.profile_decode --lq SAVED_LQ_FOLDER [--threads 1 2] [--tokens 32]
    python -m bench.profile_decode --smoke     # a tiny compressed Llama built in code, 4 tokens

One process per thread count: load the compressed model, prefill 64 tokens, then
0. in our runtime (`surgery/lq_decoder.py`, what `lqlora generate` runs, greedy): ms per
   token, split into the embedding lookup, the layer stack (one C++ call), the head (the
   exact argmax through its bfloat16 copy) and the rest (Python);
then through transformers' modules (what evaluation and finetuning run):
1. decode --tokens tokens greedily with the KV cache, no instrumentation: ms per token;
2. the same with a timer around every module's forward: each module's own time (its
   children's subtracted), grouped by class (LQLinear, the LM head, attention, norms,
   the MLP's activation), and what no module accounts for (the loop, sampling, cache
   bookkeeping);
3. the LQ layers' kernel alone on the same shapes and configs (the packed matrix-vector
   product, then the whole fused layer with its factors), against fp32's dense
   matrix-vector product of the same shapes, and the bytes each reads per token against
   the bandwidth of one streaming read of this machine.
The timers add their own cost: step 2's total is printed beside step 1's.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench._common import REPO, add_smoke, stamp, tiny_llama
from bench.profile_prefill_layers import lower_quartile_ms


def child(folder: str, threads: int, tokens: int) -> None:
    import torch

    from lqlora_dagster.quant import fast_decode
    from lqlora_dagster.surgery.injector import lq_layers
    from lqlora_dagster.surgery.lq_model_io import load_lq_model

    torch.set_num_threads(threads)
    fast_decode.kernel()
    net = load_lq_model(Path(folder), torch.device("cpu")).eval()
    vocab = min(net.config.vocab_size, 49152)
    ids = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(0))

    def decode(n: int, prefilled=lambda: None) -> float:
        with torch.no_grad():
            step = net(ids, use_cache=True, logits_to_keep=1)
            token = step.logits[:, -1:].argmax(-1)
            prefilled()  # the timers count from here: decoded tokens only
            start = time.perf_counter()
            for _ in range(n):
                step = net(token, past_key_values=step.past_key_values, use_cache=True)
                token = step.logits[:, -1:].argmax(-1)
            return (time.perf_counter() - start) * 1e3 / n

    print(f"\n### {threads} thread(s)\n")
    runtime_split(net, ids, tokens)
    decode(4)
    plain = min(decode(tokens) for _ in range(3))

    own: dict[str, float] = defaultdict(float)
    stack: list[list] = []

    def pre(module, _inputs):
        stack.append([module, time.perf_counter(), 0.0])

    def post(module, _inputs, _output):
        mod, start, children = stack.pop()
        spent = time.perf_counter() - start
        name = "LM head" if mod is net.get_output_embeddings() else type(mod).__name__
        own[name] += spent - children
        if stack:
            stack[-1][2] += spent

    hooks = [m.register_forward_pre_hook(pre) for m in net.modules()] + [
        m.register_forward_hook(post) for m in net.modules()
    ]
    decode(2)
    timed = decode(tokens, own.clear)
    for h in hooks:
        h.remove()
    print("\nThrough transformers' modules:\n")
    print(f"- decode, no timers: **{plain:.1f} ms per token** ({1e3 / plain:.1f} tokens/s)")
    print(f"- with a timer on every module: {timed:.1f} ms per token\n")
    print("| where (own time, children subtracted) | ms per token | share |\n|---|---|---|")
    accounted = 0.0
    for name, ms in sorted(own.items(), key=lambda kv: -kv[1]):
        per = ms * 1e3 / tokens
        accounted += per
        if per >= 0.05:
            print(f"| {name} | {per:.2f} | {per / timed:.0%} |")
    print(f"| outside every module (loop, argmax, cache) | {timed - accounted:.2f} | {(timed - accounted) / timed:.0%} |")

    # the kernel alone, per shape and config, summed over the model's layers
    torch.set_grad_enabled(False)
    packed_ms = fused_ms = dense_ms = 0.0
    packed_bytes = factor_bytes = dense_bytes = 0
    seen: dict[tuple, tuple[float, float, float]] = {}
    for layer in lq_layers(net).values():
        qm, args = layer._packed()
        key = (qm.shape, qm.config.name, layer.rank)
        if key not in seen:
            x_rows = torch.randn(1, qm.shape[1])
            dense = torch.randn(qm.shape)
            seen[key] = (
                lower_quartile_ms(lambda x=x_rows, q=qm, a=args: fast_decode.matmul(x, q, a), 20),
                lower_quartile_ms(lambda x=x_rows, f=layer: f(x), 20),
                lower_quartile_ms(lambda x=x_rows, d=dense: torch.nn.functional.linear(x, d), 20),
            )
        p, f, d = seen[key]
        packed_ms, fused_ms, dense_ms = packed_ms + p, fused_ms + f, dense_ms + d
        packed_bytes += sum(getattr(layer, n).numel() * getattr(layer, n).element_size() for n in
                            ("packed_codes", "packed_scale_codes", "group_scales"))
        factor_bytes += (layer.L1.numel() + layer.L2.numel()) * 4
        dense_bytes += qm.shape[0] * qm.shape[1] * 4
    big = torch.empty(64 * 2**20)
    big.fill_(1.0)
    gbps = big.numel() * 4 / lower_quartile_ms(lambda: big.sum(), 8) / 1e6
    head = net.get_output_embeddings().weight
    print(f"\nThe {len(lq_layers(net))} LQ layers alone, on one token (lower quartile of 20 calls, summed):\n")
    print("| | ms per token | MB read | ms at this machine's streaming bandwidth |\n|---|---|---|---|")
    print(f"| packed matrix-vector products (codes, scales) | {packed_ms:.2f} | {packed_bytes / 1e6:.1f} | {packed_bytes / gbps / 1e6:.2f} |")
    print(f"| whole fused layers (+ factors, bias) | {fused_ms:.2f} | {(packed_bytes + factor_bytes) / 1e6:.1f} | {(packed_bytes + factor_bytes) / gbps / 1e6:.2f} |")
    print(f"| fp32 dense matrix-vector products, same shapes | {dense_ms:.2f} | {dense_bytes / 1e6:.1f} | {dense_bytes / gbps / 1e6:.2f} |")
    print(f"| the LM head ({tuple(head.shape)}, {head.dtype}, not a target) | | {head.numel() * head.element_size() / 1e6:.1f} | {head.numel() * head.element_size() / gbps / 1e6:.2f} |")
    print(f"\nstreaming read bandwidth, one `sum` over 256 MB at {threads} thread(s): {gbps:.1f} GB/s")


def runtime_split(net, ids, tokens: int) -> None:
    """A greedy token in our runtime (as `lqlora generate` decodes at temperature 0), its
    parts timed one by one (best of three runs)."""
    import torch

    from lqlora_dagster.quant import fast_decode
    from lqlora_dagster.surgery.lq_decoder import fast_decoder, unsupported_reason

    decoder = fast_decoder(net, ids.shape[1] + 4 * tokens + 8, greedy=True)
    if decoder is None or decoder.embedding is None or decoder.head is None:
        print(f"- not split here: {unsupported_reason(net, ids.shape[1] + tokens) or 'a non-plain embedding or head'}")
        return
    kernel, greedy_head = fast_decode.kernel(), decoder.half_head is not None
    head_name = (f"head {tuple(decoder.head.shape)}: "
                 + ("the exact argmax through its bfloat16 copy" if greedy_head else "every logit, then the argmax"))

    def head(out: torch.Tensor) -> int:
        if greedy_head:
            return kernel.head_argmax(out, decoder.head, *decoder.half_head)
        return int(kernel.head_logits(out, decoder.head).argmax())

    best = None
    for _ in range(3):
        decoder.reset()
        token = decoder.greedy(ids)
        parts = defaultdict(float)
        start = time.perf_counter()
        for _ in range(tokens):
            position = decoder.length
            t0 = time.perf_counter()
            hidden = decoder.embedding[torch.tensor([token])]
            t1 = time.perf_counter()
            out = decoder.stack.step(hidden, decoder.cos[position:position + 1], decoder.sin[position:position + 1])
            t2 = time.perf_counter()
            token = head(out[-1])
            t3 = time.perf_counter()
            parts["embedding lookup"] += t1 - t0
            parts["layer stack (one C++ call: norms, packed products, factors, attention, MLP)"] += t2 - t1
            parts[head_name] += t3 - t2
        total = time.perf_counter() - start
        parts["Python between the calls"] = total - sum(parts.values())
        if best is None or total < best[0]:
            best = (total, dict(parts))
    total, parts = best
    per = total * 1e3 / tokens
    print(f"Our runtime: **{per:.2f} ms per token** ({1e3 / per:.1f} tokens/s)\n")
    print("| where | ms per token | share |\n|---|---|---|")
    for name, seconds in parts.items():
        print(f"| {name} | {seconds * 1e3 / tokens:.2f} | {seconds / total:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lq", type=Path, help="a decomposed_model artifact folder")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    add_smoke(parser)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    print(stamp())
    if args.smoke:
        from bench.make_llama1b_shaped import save_compressed

        with tempfile.TemporaryDirectory() as tmp:
            args.lq, args.threads, args.tokens = Path(tmp) / "tiny-lq", [1], 4
            save_compressed(tiny_llama(), args.lq, "nf3-b03-bf16-B016-B164")
            profile(args)
        return
    if args.lq is None:
        parser.error("--lq is required")
    profile(args)


def profile(args) -> None:
    print(f"\ncompressed model: {args.lq}")
    for threads in args.threads:
        done = subprocess.run([sys.executable, "-m", "bench.profile_decode", "--child", str(args.lq), str(threads),
                               str(args.tokens)], cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(done.stderr[-2000:])
        print(done.stdout)


if __name__ == "__main__":
    main()
