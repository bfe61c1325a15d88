"""What a user of the compressed model pays and gets, side by side with the fp32 model:
load + prefill + greedy decode (tokens/s, and the memory that loading and running added
above the interpreter after its imports), and one finetuning step of 4 x 256 tokens (LoRA
over the fp32 base vs LQ-LoRA's factors over the packed Q: seconds and memory), without
and with gradient checkpointing (`train-ckpt`, as `--finetune-gradient-checkpointing`). Every measurement runs
in a fresh process, one after the other, at 1 and 2 torch threads. With `--device cuda`
the models run on the GPU and the memory is its allocator's peak above its start.

    python -m bench.bench_inference --fp32 MODEL_FOLDER --lq SAVED_LQ_FOLDER [--threads 1 2] [--device cuda]
        [--gguf FILE.gguf ...]

The `lq` rows run our runtime (`surgery/lq_decoder.py`: the layer stack in one C++ call a
step, where the architecture is supported) as `lqlora generate` runs it at temperature 0:
the greedy token through the head's bfloat16 copy, exactly the float32 argmax; `lq, full
logits` the same runtime computing every logit, as sampling does; `lq, transformers'
forward` the same model through transformers' modules, as evaluation and finetuning do.

--gguf adds llama.cpp (llama-cpp-python) rows to `generate`: the same prompt ids, the same
threads, one fresh process each (an `lqlora export` file, or a `llama-quantize` one).

MODEL_FOLDER is a registered model's folder (LQLORA_HOME/models/NAME); SAVED_LQ_FOLDER a
`decomposed_model` artifact (LQLORA_HOME/artifacts/decomposed_model/NAME/KEY). --smoke
measures the tiny Llama built in code and its compressed copy (`make_llama1b_shaped`):
1 thread, 16 prompt tokens, 4 new ones, no plain `train` step (`train-ckpt` runs it)."""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import REPO, add_smoke, save_tiny_llama, stamp, tiny_llama

SMOLLM2_VOCAB = 49152  # the token ids are drawn below it (below the model's own vocabulary if smaller)


def llama_cpp_child(path: str, threads: int, prompt_len: int, new_tokens: int, repeats: int = 3) -> dict:
    """Load, prefill and greedy decode of a GGUF in llama.cpp, timed as the torch rows are."""
    import numpy as np
    from llama_cpp import Llama

    from lqlora_dagster.memory import PeakMemory, rss_bytes

    after_imports = rss_bytes()
    with PeakMemory() as memory:
        start = time.perf_counter()
        llm = Llama(model_path=path, n_ctx=prompt_len + new_tokens + 8, n_batch=prompt_len, n_ubatch=prompt_len,
                    n_threads=threads, n_threads_batch=threads, verbose=False)
        load_s = time.perf_counter() - start
        vocab = min(llm.n_vocab(), SMOLLM2_VOCAB)
        ids = np.random.default_rng(0).integers(0, vocab, prompt_len).tolist()

        def next_token() -> int:  # greedy, from the last position's logits (as the torch rows pick)
            return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

        llm.eval(ids[:8])  # warm-up
        prefill, decode = [], []
        for _ in range(repeats):
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids)
            prefill.append(prompt_len / (time.perf_counter() - start))
            token = next_token()
            start = time.perf_counter()
            for _ in range(new_tokens):
                llm.eval([token])
                token = next_token()
            decode.append(new_tokens / (time.perf_counter() - start))
    return {"kind": "llama.cpp", "threads": threads, "work": "generate", "load_s": load_s,
            "prefill_tok_s": max(prefill), "decode_tok_s": max(decode),
            "added_mb": (memory.peak - after_imports) / 2**20}


def child(kind: str, folder: str, threads: int, work: str, prompt_len: int, new_tokens: int, device: str,
          repeats: int = 3) -> dict:
    if kind == "llama.cpp":
        return llama_cpp_child(folder, threads, prompt_len, new_tokens, repeats)
    import torch

    from lqlora_dagster.memory import PeakMemory, rss_bytes
    from lqlora_dagster.quant import fast_decode

    torch.set_num_threads(threads)
    device = torch.device(device)
    fast_decode.kernel()  # build/load the extension with the imports, not inside the timing
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from lqlora_dagster.surgery.injector import lq_layers
    from lqlora_dagster.surgery.lora_linear import add_lora
    from lqlora_dagster.surgery.lq_decoder import fast_decoder
    from lqlora_dagster.surgery.lq_model_io import load_lq_model

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():  # imports the architecture's code (~100 MB) before the baseline
        AutoModelForCausalLM.from_config(config)
    vocab = min(config.vocab_size, SMOLLM2_VOCAB)
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context, before the baseline
    after_imports = rss_bytes()
    out: dict = {"kind": kind, "threads": threads, "work": work}

    def now() -> float:  # GPU work is asynchronous: wait for it before reading the clock
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    with PeakMemory() as memory, PeakMemory(device) as on_device:
        start = now()
        if kind == "fp32":
            net = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
        else:
            net = load_lq_model(Path(folder), device)
        decoder = None
        if kind in ("lq", "lq-logits") and work == "generate":
            decoder = fast_decoder(net.eval(), prompt_len + new_tokens + 8, greedy=kind == "lq")
        out["load_s"] = now() - start
        if work == "generate" and decoder is not None:  # our runtime: the whole stack in one call a step
            def after(tokens: torch.Tensor) -> int:
                return decoder.greedy(tokens) if kind == "lq" else int(decoder.logits(tokens).argmax())

            prefill, decode = [], []
            after(ids[:, :8])  # warm-up
            for _ in range(repeats):
                decoder.reset()
                start = now()
                token = after(ids)
                prefill.append(prompt_len / (now() - start))
                start = now()
                for _ in range(new_tokens):
                    token = after(torch.tensor([token]))
                decode.append(new_tokens / (now() - start))
            out["prefill_tok_s"], out["decode_tok_s"] = max(prefill), max(decode)
        elif work == "generate":  # transformers' forward, as `generate` runs a model outside our runtime
            net.eval()
            prefill, decode = [], []
            with torch.no_grad():
                net(ids[:, :8])  # warm-up
                for _ in range(repeats):  # the best of a few: other tenants of a shared machine add noise
                    start = now()
                    step = net(ids, use_cache=True, logits_to_keep=1)  # as `generate` prefills
                    prefill.append(prompt_len / (now() - start))
                    token = step.logits[:, -1:].argmax(-1)
                    start = now()
                    for _ in range(new_tokens):
                        step = net(token, past_key_values=step.past_key_values, use_cache=True)
                        token = step.logits[:, -1:].argmax(-1)
                    decode.append(new_tokens / (now() - start))
            out["prefill_tok_s"], out["decode_tok_s"] = max(prefill), max(decode)
        else:  # one optimizer-free training step: forward + backward of a batch, factors only
            if kind == "fp32":
                layout = json.loads((Path(work.split(":", 1)[1]) / "lqlora.json").read_text())["layers"]
                net.requires_grad_(False)  # the same targets and rank as the compressed model
                add_lora(net, list(layout), next(iter(layout.values()))["rank"])
                net.to(device)
            else:
                net.requires_grad_(False)
                for layer in lq_layers(net).values():
                    layer.L1.requires_grad_(True)
                    layer.L2.requires_grad_(True)
            if work.startswith("train-ckpt"):
                from lqlora_dagster.training.finetune import enable_checkpointing

                enable_checkpointing(net)
            net.train()
            batch = torch.randint(0, vocab, (4, 256), generator=torch.Generator().manual_seed(1)).to(device)
            times = []
            for _ in range(3):
                start = now()
                net(input_ids=batch, labels=batch).loss.backward()
                times.append(now() - start)
                net.zero_grad(set_to_none=True)
            out["step_s"] = min(times[1:])
    out["added_mb"] = (memory.peak - after_imports) / 2**20
    if device.type == "cuda":  # on a GPU the weights, activations and caches live in its memory
        out["added_mb"] = on_device.added_mb
    return out


def run(kind: str, folder: Path, threads: int, work: str, args) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_inference", "--child", kind, str(folder), str(threads), work,
           str(args.prompt_len), str(args.new_tokens), args.device]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, folder, threads, work, prompt_len, new_tokens, device = sys.argv[2:9]
        print(json.dumps(child(kind, folder, int(threads), work, int(prompt_len), int(new_tokens), device)))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fp32", type=Path, help="the registered model's folder")
    p.add_argument("--lq", type=Path, help="a saved decomposed model folder")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--no-train", action="store_true", help="skip the finetuning-step comparison")
    p.add_argument("--gguf", type=Path, nargs="+", default=[], help="GGUF files to run in llama.cpp beside them")
    p.add_argument("--device", default="cpu",
                   help="cpu, or cuda (then added MB is the GPU allocator's peak above its start)")
    add_smoke(p)
    args = p.parse_args()
    print(stamp())
    if args.smoke:
        from bench.make_llama1b_shaped import save_compressed

        args.threads, args.prompt_len, args.new_tokens = [1], 16, 4
        with tempfile.TemporaryDirectory() as tmp:
            args.fp32 = save_tiny_llama(Path(tmp) / "tiny")
            args.lq = Path(tmp) / "tiny-lq"
            save_compressed(tiny_llama(), args.lq, "nf3-b03-bf16-B016-B164")
            compare(args)
        return
    if args.fp32 is None or args.lq is None:
        p.error("--fp32 and --lq are required")
    compare(args)


def compare(args) -> None:
    """Every work at every thread count, fp32 against lq, each in a fresh process."""
    layout = json.loads((args.lq / "lqlora.json").read_text())
    print(f"\ncompressed model: {args.lq} ({len(layout['layers'])} LQ layers)\n")
    print("| work | threads | model | load s | prefill tok/s | decode tok/s | step s | added MB |")
    print("|---|---|---|---|---|---|---|---|")
    works = ["generate"] + ([] if args.no_train else [f"train:{args.lq}", f"train-ckpt:{args.lq}"])
    if args.smoke:  # the plain step is the checkpointed one minus checkpointing
        works = [w for w in works if not w.startswith("train:")]
    for work in works:
        for threads in args.threads:
            rows = {kind: run(kind, folder, threads, work, args) for kind, folder in
                    (("fp32", args.fp32), ("lq", args.lq))}
            if work == "generate":
                rows["lq, full logits"] = run("lq-logits", args.lq, threads, work, args)
                rows["lq, transformers' forward"] = run("lq-modules", args.lq, threads, work, args)
                rows.update({f"llama.cpp {g.name}": run("llama.cpp", g, threads, work, args) for g in args.gguf})
            for kind, r in rows.items():
                print(f"| {work.split(':')[0]} | {threads} | {kind} | {r['load_s']:.2f} | "
                      f"{r.get('prefill_tok_s', float('nan')):.1f} | {r.get('decode_tok_s', float('nan')):.1f} | "
                      f"{r.get('step_s', float('nan')):.2f} | {r['added_mb']:,.0f} |")
            fp, lq = rows["fp32"], rows["lq"]
            if work == "generate":
                print(f"| ratio lq/fp32 | {threads} | | | {lq['prefill_tok_s'] / fp['prefill_tok_s']:.2f}x | "
                      f"{lq['decode_tok_s'] / fp['decode_tok_s']:.2f}x | | {lq['added_mb'] / fp['added_mb']:.2f}x |")
                for g in args.gguf:
                    ref = rows[f"llama.cpp {g.name}"]
                    print(f"| ratio lq/llama.cpp {g.name} | {threads} | | | "
                          f"{lq['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x | "
                          f"{lq['decode_tok_s'] / ref['decode_tok_s']:.2f}x | | |")
            else:
                print(f"| ratio lq/fp32 | {threads} | | | | | {lq['step_s'] / fp['step_s']:.2f}x | "
                      f"{lq['added_mb'] / fp['added_mb']:.2f}x |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
