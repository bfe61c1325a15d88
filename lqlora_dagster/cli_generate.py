"""`lqlora generate`: stream text from a finetuned compressed model, in lqlora itself or
(`--engine llama.cpp`) from its GGUF export, greedy or sampled; everything the user
typed is checked before the model loads."""

import argparse
import sys
import time
from pathlib import Path

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.pipeline.registry import check_model_name, registered_models
from lqlora_dagster.sampling import Sampling
from lqlora_dagster.store.warehouse import Warehouse


def add_generate_parser(sub, default_model: str) -> argparse.ArgumentParser:
    g = sub.add_parser("generate", help="stream text from a finetuned compressed model, in lqlora or in llama.cpp")
    g.add_argument("prompt")
    g.add_argument("--model", default=default_model)
    g.add_argument("--method", help="which adapter (default: the first trained); 'reference' = uncompressed + LoRA")
    g.add_argument("--budget", type=float, help="the plan's budget in bits/param (default: the first trained)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--no-adapter", action="store_true", help="the compressed model before finetuning")
    g.add_argument("--engine", choices=["lqlora", "llama.cpp"], default="lqlora",
                   help="lqlora: the compressed model as trained; llama.cpp: its latest GGUF export "
                   "(`lqlora export`)")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above: sample")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens with this "
                   "probability mass (default: 1, all)")
    g.add_argument("--seed", type=int, default=0, help="the sampling seed (same seed, same text)")
    g.set_defaults(func=cmd_generate)
    return g


def latest_gguf(home: Path, model: str, method: str, budget: float | None) -> Path:
    """The newest GGUF export of this adapter that is still on disk."""
    rows = Warehouse(home / "lqlora.duckdb").query(
        "SELECT path FROM exports WHERE model = ? AND method = ? AND format = 'gguf' "
        "AND budget IS NOT DISTINCT FROM ? ORDER BY created_at DESC",
        [model, method, budget], read_only=True,
    )
    for folder in rows["path"]:
        if (Path(folder) / "model.gguf").is_file():
            return Path(folder) / "model.gguf"
    what = f"--method {method}" + ("" if budget is None else f" --budget {budget:g}")
    raise LQLoRAInputError(f"no GGUF export of {model!r} {method}{'' if budget is None else f' @ {budget:g}'}; "
                           f"write one with `lqlora export OUT.gguf --model {model} {what}`")


def _generate_in_llama_cpp(home: Path, args, ref, ids: list[int], sampling: Sampling) -> int:
    # deferred: help and refused arguments answer before llama.cpp loads
    from lqlora_dagster.export import llama_runtime

    path = latest_gguf(home, args.model, ref.method, ref.budget)
    print(f"[{args.model}, {ref.method}{'' if ref.budget is None else f' @ {ref.budget:g} bits'}, llama.cpp: "
          f"{path.stat().st_size / 1e6:.1f} MB]", file=sys.stderr)
    start, made = time.perf_counter(), 0
    for _, text in llama_runtime.stream(path, ids, args.max_new_tokens, sampling):
        print(text, end="", flush=True)
        made += 1
    seconds = time.perf_counter() - start
    print()
    print(f"{made} tokens in {seconds:.1f} s ({made / seconds:.1f} tokens/s, loading included)", file=sys.stderr)
    return 0


def cmd_generate(args: argparse.Namespace, home: Path) -> int:
    """Stream a continuation from a finetuned compressed model, then its speed and memory.
    Everything a user typed is checked before the model is loaded."""
    # deferred: help and refused arguments answer before dagster and torch load
    from transformers import AutoConfig

    from assets.runs import stored_handle
    from lqlora_dagster.generate import check_room, generate, load_for_generation, prompt_ids
    from lqlora_dagster.memory import PeakMemory
    from lqlora_dagster.models.loading import load_tokenizer
    from lqlora_dagster.pipeline.context import StageContext
    from lqlora_dagster.pipeline.finetuning import pick_adapter

    sampling = Sampling(args.temperature, args.top_p, args.seed)
    if args.engine == "llama.cpp" and args.no_adapter:
        raise LQLoRAInputError("--no-adapter runs the compressed model before finetuning, which only lqlora holds; "
                               "drop --engine llama.cpp")
    if args.max_new_tokens < 1:
        raise LQLoRAInputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    check_model_name(args.model)
    if args.model not in set(registered_models(Warehouse(home / "lqlora.duckdb"))["model"]):
        raise LQLoRAInputError(
            f"model {args.model!r} is not registered (`lqlora models` lists them); register it with "
            f"`lqlora register SOURCE --name {args.model}`, then `lqlora run --model {args.model}`"
        )
    try:
        model = stored_handle(home, "base_model", args.model)
        adapters = stored_handle(home, "finetuned_adapters", args.model)
    except FileNotFoundError as err:
        raise LQLoRAInputError(f"nothing finetuned for {args.model!r} yet; run `lqlora run --model {args.model}`") from err
    ref = pick_adapter(adapters, args.method, args.budget)
    tokenizer = load_tokenizer(Path(model.folder))
    ids = prompt_ids(tokenizer, args.prompt, args.chat)
    check_room(AutoConfig.from_pretrained(model.folder), ids.shape[1], args.max_new_tokens)
    if args.engine == "llama.cpp":
        return _generate_in_llama_cpp(home, args, ref, ids[0].tolist(), sampling)
    with PeakMemory() as loading:
        net = load_for_generation(StageContext.at(home), model, ref, finetuned=not args.no_adapter)
    print(f"[{args.model}, {ref.method}{'' if ref.budget is None else f' @ {ref.budget:g} bits'}"
          f"{', no adapter' if args.no_adapter else ''}]", file=sys.stderr)
    result = generate(net, tokenizer, ids, args.max_new_tokens, stream=lambda text: print(text, end="", flush=True),
                      sampling=sampling)
    print()
    print(f"{result.new_tokens} tokens in {result.seconds:.1f} s ({result.tokens_per_s:.1f} tokens/s, "
          f"{result.engine}); "
          f"the model took {loading.added_mb:,.0f} MB to load and {result.added_mb:,.0f} MB more to generate",
          file=sys.stderr)
    return 0
