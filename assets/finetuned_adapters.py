"""Asset `finetuned_adapters`: trained L1, L2 per decomposed model (PEFT format)."""

import math

import dagster as dg

from assets.stage_asset import Produced, stage_asset
from lqlora_dagster.data.selection import TaskData
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.finetuning import ASSET, FINETUNE_VERSION, label, run_finetuning
from lqlora_dagster.pipeline.handles import DecomposedHandle, FinetunedHandle, ModelHandle
from lqlora_dagster.pipeline.settings import FinetuneSettings


@stage_asset("finetune", FINETUNE_VERSION, {"pytorch", "safetensors"}, settings=FinetuneSettings)
def finetuned_adapters(
    ctx: StageContext,
    settings: FinetuneSettings,
    base_model: ModelHandle,
    task_data: TaskData,
    decomposed_model: DecomposedHandle,
) -> Produced:
    """LoRA factors after finetuning (PEFT adapter folders; every step in DuckDB `train_steps`)."""
    handle = run_finetuning(ctx, base_model, decomposed_model, task_data, settings)
    paths = {
        label(a): str(ctx.store.get(ASSET, handle.model, a.run_key, verify=False).path) for a in handle.items
    }
    return Produced(
        handle,
        "-".join(a.run_key for a in handle.items) or "none",
        [_line(a) for a in handle.items] or ["nothing selected to finetune"],
        {
            "final_loss": dg.MetadataValue.json({label(a): round(a.final_loss, 4) for a in handle.items}),
            "paths": dg.MetadataValue.json(paths),
        },
    )


def _line(a) -> str:
    best = f", best val {a.best_val_loss:.3f} at step {a.best_step}" if a.best_step is not None else ""
    return f"{label(a)}: final loss {a.final_loss:.3f}{best}, lr {a.lr:g}"


@dg.asset_check(asset=finetuned_adapters, description="Every adapter finished training with a finite loss.")
def training_loss_finite(finetuned_adapters: FinetunedHandle) -> dg.AssetCheckResult:
    bad = [label(a) for a in finetuned_adapters.items if not math.isfinite(a.final_loss)]
    return dg.AssetCheckResult(
        passed=not bad,
        metadata={"adapters": len(finetuned_adapters.items), "bad": dg.MetadataValue.json(bad)},
    )
