"""Asset `finetuned_adapters`: trained L1, L2 per decomposed model (PEFT format)."""

import math

import dagster as dg

from assets.config import config_class
from assets.shared import BASE_MODELS, stage_context, summary
from lqlora_dagster.data.selection import TaskData
from lqlora_dagster.pipeline.finetuning import ASSET, FINETUNE_VERSION, label, run_finetuning
from lqlora_dagster.pipeline.handles import DecomposedHandle, FinetunedHandle, ModelHandle
from lqlora_dagster.pipeline.settings import FinetuneSettings
from lqlora_dagster.pipeline.stage_runs import measured_stage
from resources import ArtifactStoreResource, ComputeDevice, ModelSource, WarehouseResource

FinetuneConfig = config_class(FinetuneSettings)


@dg.asset(
    partitions_def=BASE_MODELS,
    group_name="finetune",
    code_version=FINETUNE_VERSION,
    description="LoRA factors after finetuning (PEFT adapter folders; every step in DuckDB `train_steps`).",
    kinds={"pytorch", "safetensors"},
)
def finetuned_adapters(
    context: dg.AssetExecutionContext,
    config: FinetuneConfig,
    base_model: ModelHandle,
    task_data: TaskData,
    decomposed_model: DecomposedHandle,
    warehouse: WarehouseResource,
    artifacts: ArtifactStoreResource,
    models: ModelSource,
    compute: ComputeDevice,
) -> dg.Output[FinetunedHandle]:
    ctx = stage_context(context, warehouse, artifacts, models, compute)
    with measured_stage(ctx, "finetuned_adapters", base_model.model):
        handle = run_finetuning(ctx, base_model, decomposed_model, task_data, config.settings())
    return dg.Output(
        handle,
        data_version=dg.DataVersion("-".join(a.run_key for a in handle.items) or "none"),
        metadata={
            "final_loss": dg.MetadataValue.json(
                {label(a): round(a.final_loss, 4) for a in handle.items}
            ),
            "summary": summary([_line(a) for a in handle.items])
            or "nothing selected to finetune",
            "paths": dg.MetadataValue.json(
                {
                    label(a): str(
                        ctx.store.get(ASSET, handle.model, a.run_key, verify=False).path
                    )
                    for a in handle.items
                }
            ),
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
