"""`lqlora generate`: stream text from a finetuned compressed model, everything the user
typed checked before the model loads."""

import argparse
import sys
from pathlib import Path

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.pipeline.registry import check_model_name, registered_models
from lqlora_dagster.store.warehouse import Warehouse


def cmd_generate(args: argparse.Namespace, home: Path) -> int:
    """Stream a continuation from a finetuned compressed model, then its speed and memory.
    Everything a user typed is checked before the model is loaded."""
    # deferred: help and refused arguments answer before dagster and torch load
    from transformers import AutoConfig

    from assets.runs import stored_handle
    from lqlora_dagster.generate import check_room, generate, load_for_generation, pick_adapter, prompt_ids
    from lqlora_dagster.memory import PeakMemory
    from lqlora_dagster.models.loading import load_tokenizer
    from lqlora_dagster.pipeline.context import StageContext

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
    with PeakMemory() as loading:
        net = load_for_generation(StageContext.at(home), model, ref, finetuned=not args.no_adapter)
    print(f"[{args.model}, {ref.method}{'' if ref.budget is None else f' @ {ref.budget:g} bits'}"
          f"{', no adapter' if args.no_adapter else ''}]", file=sys.stderr)
    result = generate(net, tokenizer, ids, args.max_new_tokens, stream=lambda text: print(text, end="", flush=True))
    print()
    print(f"{result.new_tokens} tokens in {result.seconds:.1f} s ({result.tokens_per_s:.1f} tokens/s); "
          f"the model took {loading.added_mb:,.0f} MB to load and {result.added_mb:,.0f} MB more to generate",
          file=sys.stderr)
    return 0
