"""Scoring an export in the runtime it is for, beside the model it came from.

The windows are the run's held-out evaluation windows (the same ids for every runtime).
A GGUF is scored by llama.cpp, and also by transformers reading the same file (what
this package computes from those bytes: the two agree to within what llama.cpp's
integer kernels change); merged weights and PEFT exports by transformers. The in-tool
model's perplexity on those windows is the evaluation stage's row when the settings
match, else computed here. Rows go to `evaluations` with stage `exported`.
"""

import dataclasses
from pathlib import Path

import pandas as pd
import torch

from lqlora_dagster.data.selection import TaskData
from lqlora_dagster.export import llama_runtime
from lqlora_dagster.metrics import perplexity
from lqlora_dagster.models.loading import load_tokenizer
from lqlora_dagster.pipeline.evaluating import EVAL_VERSION
from lqlora_dagster.pipeline.finetuning import load_finetuned, spread
from lqlora_dagster.pipeline.handles import AdapterRef, ExportHandle, ModelHandle
from lqlora_dagster.pipeline.settings import EvalSettings, ExportSettings
from lqlora_dagster.store.keys import stable_key
from lqlora_dagster.store.schemas import EVALUATIONS
from lqlora_dagster.tasks import task_of_data


def held_out_windows(model: ModelHandle, data: TaskData, s: ExportSettings) -> torch.Tensor:
    task = task_of_data(data.task)
    encoded = task.examples(load_tokenizer(Path(model.folder)), data, "eval", s.check_len)
    return spread(encoded.tensors, s.check_windows)["input_ids"]


def _stored(ctx, key: str) -> float | None:
    found = ctx.warehouse.query("SELECT value FROM evaluations WHERE eval_key = ?", [key])
    return None if found.empty else float(found["value"][0])


def in_tool_perplexity(ctx, model: ModelHandle, ref: AdapterRef, data: TaskData, windows: torch.Tensor,
                       s: ExportSettings) -> float:
    """The finetuned model as lqlora runs it, on the check's windows."""
    evaluated = EvalSettings(seq_len=s.check_len, n_windows=s.check_windows)
    known = _stored(ctx, stable_key(ref.run_key, evaluated, data.content_id("eval"), EVAL_VERSION))
    if known is not None:
        return known
    ctx.log("export check: scoring the in-tool model on the check's windows")
    return perplexity(load_finetuned(ctx, model, ref, device=ctx.device), windows)


def _transformers_model(handle: ExportHandle):
    # transformers loads on first use (0.6 s): commands that read no model skip it
    from transformers import AutoModelForCausalLM

    path = Path(handle.path)
    if handle.format == "gguf":
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    if handle.format == "hf":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    from peft import PeftModel  # the PEFT export is the only reader of peft here

    base = AutoModelForCausalLM.from_pretrained(path / "base", dtype=torch.float32)
    return PeftModel.from_pretrained(base, path / "adapter")


def check_export(ctx, model: ModelHandle, ref: AdapterRef, handle: ExportHandle, data: TaskData,
                 s: ExportSettings) -> ExportHandle:
    if data.task != "lm":
        ctx.log(f"export check: scores perplexity on text; this run's data is {data.task!r}, so it is left out")
        return handle
    held_out = data.content_id("eval")
    windows = held_out_windows(model, data, s)
    in_tool = in_tool_perplexity(ctx, model, ref, data, windows, s)
    runtimes = ["llama.cpp", "transformers"] if handle.format == "gguf" else ["transformers"]
    scores: dict[str, float] = {}
    bits = _target_bits(ctx, handle.export_key)
    for runtime in runtimes:
        key = stable_key(handle.export_key, runtime, s.check_len, s.check_windows, held_out, EVAL_VERSION)
        value = _stored(ctx, key)
        if value is None:
            ctx.log(f"export check: perplexity of the {handle.format} export in {runtime}")
            if runtime == "llama.cpp":
                value = llama_runtime.perplexity(Path(handle.path), windows)
            else:
                value = perplexity(_transformers_model(handle).eval(), windows)
            row = {"eval_key": key, "model": model.model, "method": ref.method, "budget": ref.budget,
                   "stage": "exported", "metric": "perplexity", "value": value, "perplexity": value,
                   "bits_per_param": bits, "bits_incl_lowrank": None, "peak_mb": None,
                   "n_tokens": int(windows.shape[0] * (windows.shape[1] - 1)), "seq_len": s.check_len,
                   "plan_id": ref.plan_id, "macro_f1": None, "dataset": "{} ({})".format(*data.source("eval")),
                   "lr": None, "runtime": runtime, "export_key": handle.export_key}
            ctx.warehouse.upsert("evaluations", EVALUATIONS.validate(pd.DataFrame([row])), ["eval_key"])
        scores[runtime] = value
    exported = scores[runtimes[0]]
    ctx.log(f"export check: {handle.format} in {runtimes[0]} perplexity {exported:.3f}, in lqlora {in_tool:.3f}"
            + (f", the same file in transformers {scores['transformers']:.3f}" if len(runtimes) > 1 else ""))
    return dataclasses.replace(handle, exported_ppl=exported, in_tool_ppl=in_tool)


def _target_bits(ctx, export_key: str) -> float | None:
    found = ctx.warehouse.query("SELECT target_bits FROM exports WHERE export_key = ?", [export_key])
    return None if found.empty or pd.isna(found["target_bits"][0]) else float(found["target_bits"][0])
