"""Stages `calibration_batches` and `fisher_diagonals`: the task's calibration
examples, tokenized once; then the empirical Fisher diagonal of every target."""

from pathlib import Path

import pandas as pd
import torch

from lqlora_dagster.fisher import estimate_fisher
from lqlora_dagster.models.loading import load_tokenizer
from lqlora_dagster.pipeline.base_model import load_with_targets
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.handles import CalibrationHandle, FisherHandle, ModelHandle
from lqlora_dagster.pipeline.settings import CalibrationSettings
from lqlora_dagster.store.keys import stable_key
from lqlora_dagster.tasks import get_task

CALIBRATION_VERSION = "1"
FISHER_VERSION = "1"


def calibration_examples(model: ModelHandle, s: CalibrationSettings) -> torch.Tensor | dict[str, torch.Tensor]:
    return get_task(model.task).calibration_examples(load_tokenizer(Path(model.folder)), s)


def run_calibration(ctx: StageContext, model: ModelHandle, s: CalibrationSettings) -> CalibrationHandle:
    source, text_id = get_task(model.task).calibration_source(s)
    key = stable_key(model.key, s, text_id, CALIBRATION_VERSION)
    handle = CalibrationHandle(model.model, key, s.n_sequences, s.seq_len)
    if ctx.store.find("calibration_batches", model.model, key) is not None:
        ctx.log(f"calibration {key}: cached")
        return handle
    art = ctx.store.save_tensors("calibration_batches", model.model, key, calibration_examples(model, s))
    row = {
        "key": key,
        "model": model.model,
        "text": source,
        "n_sequences": s.n_sequences,
        "seq_len": s.seq_len,
        "path": str(art.path),
    }
    ctx.warehouse.upsert("calibration", pd.DataFrame([row]), ["key"])
    return handle


def load_calibration(ctx: StageContext, handle: CalibrationHandle) -> torch.Tensor | dict[str, torch.Tensor]:
    """Token windows (causal LM), or {input_ids, attention_mask, labels} (classifier)."""
    art = ctx.store.get("calibration_batches", handle.model, handle.key)
    tensors = ctx.store.load_tensors(art)[0]
    return tensors if "labels" in tensors else tensors["input_ids"]


def run_fisher(ctx: StageContext, model: ModelHandle, calibration: CalibrationHandle) -> FisherHandle:
    key = stable_key(model.key, calibration.key, FISHER_VERSION)
    handle = FisherHandle(model.model, key, model.n_targets)
    if ctx.store.find("fisher_diagonals", model.model, key) is not None:
        ctx.log(f"fisher {key}: cached")
        return handle
    base, targets = load_with_targets(model, ctx.device)
    batches = load_calibration(ctx, calibration)

    def progress(i: int, n: int) -> None:
        if i % max(1, n // 8) == 0 or i == n:
            ctx.progress("fisher", i, n, "sequences")

    fisher = estimate_fisher(base, batches, targets, progress=progress)
    ctx.store.save_tensors("fisher_diagonals", model.model, key, fisher)
    stats = pd.DataFrame(
        [
            {"key": key, "model": model.model, "matrix": n, "mean": float(f.mean()), "max": float(f.max())}
            for n, f in fisher.items()
        ]
    )
    ctx.warehouse.replace_rows("fisher_stats", stats, {"key": key})
    return handle


def load_fisher(ctx: StageContext, handle: FisherHandle) -> dict[str, torch.Tensor]:
    art = ctx.store.get("fisher_diagonals", handle.model, handle.key)
    return ctx.store.load_tensors(art)[0]
