"""`lqlora export`: a finetuned model as a GGUF file for llama.cpp, merged weights for
transformers/vLLM, or a PEFT adapter, copied to OUT after the export job ran.

Everything a user typed is checked before the job starts: the format's knobs, OUT, that
the model was finetuned with that method and budget, that llama.cpp's converter knows
the architecture and that the budget is within reach of the allowed types.
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

from lqlora_dagster.cli_args import add_knob_flags, stage_overrides
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.knobs import from_values, knob_values
from lqlora_dagster.pipeline.settings import ExportSettings
from lqlora_dagster.store.warehouse import Warehouse

ASSET = "exported_model"


def add_export_parser(sub, default_model: str, run_flags) -> argparse.ArgumentParser:
    ex = sub.add_parser(
        "export",
        help="write a finetuned model for llama.cpp (GGUF, an ILP-chosen mix of its types), transformers "
        "(merged weights) or PEFT, scored in that runtime",
    )
    ex.add_argument("out", type=Path, help="the file to write (gguf: e.g. model.gguf) or the folder (hf, peft)")
    run_flags(ex, default_model)
    ex.add_argument("--force", action="store_true", help="replace OUT if it exists")
    add_knob_flags(ex, [ASSET], classes={ASSET: ExportSettings})
    return ex


def export_settings(args: argparse.Namespace) -> ExportSettings:
    return from_values(ExportSettings, stage_overrides(args).get(ASSET, {}))


def check_out(out: Path, fmt: str, force: bool) -> Path:
    out = out.expanduser().resolve()
    if fmt == "gguf" and out.suffix.lower() != ".gguf":
        raise LQLoRAInputError(f"{out} is where the GGUF file goes; name it *.gguf (llama.cpp looks for that)")
    if out.exists() and not force:
        raise LQLoRAInputError(f"{out} exists; pass --force to replace it, or choose another path")
    parent = out.parent
    if not parent.is_dir():
        raise LQLoRAInputError(f"the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise LQLoRAInputError(f"cannot write into {parent}: permission denied")
    return out


def check_ready(home: Path, model: str, s: ExportSettings) -> None:
    """Refuse before the job: a model never run or never finetuned with that method and
    budget, an architecture llama.cpp cannot take, a budget no mix of types meets."""
    # deferred: help and refused arguments answer before dagster and torch load
    from assets.runs import stored_handle
    from lqlora_dagster.pipeline.exporting import check_export_settings, json_config
    from lqlora_dagster.pipeline.finetuning import pick_adapter

    try:
        adapters = stored_handle(home, "finetuned_adapters", model)
        base = stored_handle(home, "base_model", model)
    except FileNotFoundError as err:
        raise LQLoRAInputError(f"model {model!r} has no finetuned adapters yet; run `lqlora run --model {model}` "
                               "first, then export") from err
    pick_adapter(adapters, s.method, s.budget)
    targets = Warehouse(home / "lqlora.duckdb").query(
        "SELECT name, rows, cols FROM matrices WHERE model = ?", [model], read_only=True
    )
    shapes = {r.name: (int(r.rows), int(r.cols)) for r in targets.itertuples()}
    check_export_settings(base, json_config(base).get("architectures") or [], s, shapes)


def copy_out(artifact: Path, out: Path) -> None:
    """Copy under a temporary name, then rename: OUT is never half-written."""
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    if artifact.is_dir():
        shutil.copytree(artifact, tmp)
    else:
        shutil.copyfile(artifact, tmp)
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


def cmd_export(args: argparse.Namespace, home: Path, run) -> int:
    """`run(args, home, run_config, job, stages) -> bool` launches the export job."""
    # deferred: help and refused arguments answer before dagster and torch load
    from assets.runs import stored_handle
    from lqlora_dagster.definitions import EXPORT_JOB

    s = export_settings(args)
    out = check_out(args.out, s.format, args.force)
    check_ready(home, args.model, s)
    config = {"ops": {ASSET: {"config": knob_values(s)}}}
    if not run(args, home, config, EXPORT_JOB, [ASSET]):
        return 1
    handle = stored_handle(home, ASSET, args.model)
    copy_out(Path(handle.path), out)
    what = f"{handle.method}{'' if handle.budget is None else f' @ {handle.budget:g}'}"
    print(f"wrote {out} ({handle.file_bytes / 1e6:.1f} MB): {what} as {handle.format}")
    if handle.exported_ppl is not None:
        runtime = "llama.cpp" if handle.format == "gguf" else "transformers"
        print(f"held-out perplexity in {runtime}: {handle.exported_ppl:.3f} (in lqlora: {handle.in_tool_ppl:.3f})")
        rise = handle.exported_ppl / handle.in_tool_ppl - 1
        if rise > handle.margin:
            hint = "; a larger --bits or --max-size keeps more" if handle.format == "gguf" else ""
            print(f"warning: the file scores {rise:.1%} above the in-tool model (margin {handle.margin:.0%}){hint}",
                  file=sys.stderr)
    if handle.format == "gguf":
        print(f"run it: llama-cli -m {out} -p \"...\"   or   lqlora generate \"...\" --engine llama.cpp "
              f"--model {args.model}")
    return 0
