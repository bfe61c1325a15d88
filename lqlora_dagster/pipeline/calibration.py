"""Stages `calibration_batches` and `fisher_diagonals`: examples of the run's
calibration data (`task_data`), tokenized once; then the empirical Fisher diagonal of
every target."""

from pathlib import Path

import pandas as pd
import torch

from lqlora_dagster.data.selection import TaskData
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.fisher import estimate_fisher
from lqlora_dagster.models.loading import load_tokenizer
from lqlora_dagster.pipeline.base_model_stage import load_with_targets
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.handles import CalibrationHandle, FisherHandle, ModelHandle
from lqlora_dagster.pipeline.settings import CalibrationSettings
from lqlora_dagster.store.keys import stable_key
from lqlora_dagster.tasks import get_task, task_of_data

CALIBRATION_VERSION = "2"
FISHER_VERSION = "1"


def pick_examples(tensors: dict[str, torch.Tensor], n: int, seed: int, what: str) -> dict[str, torch.Tensor]:
    """`n` examples drawn without replacement by `seed` (kept in their order)."""
    available = len(tensors["input_ids"])
    if n > available:
        raise LQLoRAInputError(
            f"{n} calibration sequences asked, the {what} holds {available}; ask for fewer "
            "(--calibration-sequences), shorter ones (--calibration-len), or give more data"
        )
    pick = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return {k: v[pick] for k, v in tensors.items()}


def calibration_examples(model: ModelHandle, data: TaskData, s: CalibrationSettings) -> dict[str, torch.Tensor]:
    encoded = task_of_data(data.source("calibration")[0].task).examples(load_tokenizer(Path(model.folder)), data, "calibration", s.seq_len)
    spec, piece = data.source("calibration")
    return pick_examples(encoded.tensors, s.n_sequences, s.seed, f"calibration data ({spec.name}, {piece})")


def run_calibration(ctx: StageContext, model: ModelHandle, data: TaskData, s: CalibrationSettings) -> CalibrationHandle:
    key = stable_key(model.key, s, data.content_id("calibration"), CALIBRATION_VERSION)
    handle = CalibrationHandle(model.model, key, s.n_sequences, s.seq_len, data.labels)
    if ctx.store.find("calibration_batches", model.model, key) is not None:
        ctx.log(f"calibration {key}: cached")
        return handle
    art = ctx.store.save_tensors("calibration_batches", model.model, key, calibration_examples(model, data, s))
    spec, piece = data.source("calibration")
    row = {
        "key": key,
        "model": model.model,
        "text": spec.name if piece == "all" else f"{spec.name} ({piece} part)",
        "n_sequences": s.n_sequences,
        "seq_len": s.seq_len,
        "path": str(art.path),
    }
    ctx.warehouse.upsert("calibration", pd.DataFrame([row]), ["key"])
    return handle


def load_calibration(ctx: StageContext, handle: CalibrationHandle) -> torch.Tensor | dict[str, torch.Tensor]:
    """{input_ids, ...}: token windows, or rows with their attention mask and labels."""
    art = ctx.store.get("calibration_batches", handle.model, handle.key)
    return ctx.store.load_tensors(art)[0]


def run_fisher(ctx: StageContext, model: ModelHandle, calibration: CalibrationHandle) -> FisherHandle:
    key = stable_key(model.key, calibration.key, FISHER_VERSION)
    handle = FisherHandle(model.model, key, model.n_targets)
    if ctx.store.find("fisher_diagonals", model.model, key) is not None:
        ctx.log(f"fisher {key}: cached")
        return handle
    base, targets = load_with_targets(model, ctx.device)
    get_task(model.task).fit_head(base, calibration.labels)
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
