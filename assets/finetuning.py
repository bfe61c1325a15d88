"""Asset `finetuned_adapters`: trained L1, L2 per decomposed model (PEFT format)."""

import math

import dagster as dg
from pydantic import Field

from assets.shared import BASE_MODELS, stage_context
from lqlora_dagster.pipeline.finetuning import ASSET, FINETUNE_VERSION, run_finetuning
from lqlora_dagster.pipeline.handles import DecomposedHandle, FinetunedHandle, ModelHandle
from lqlora_dagster.pipeline.settings import FinetuneSettings
from resources import ArtifactStoreResource, ComputeDevice, ModelSource, WarehouseResource


class FinetuneConfig(dg.Config):
    steps: int = Field(default=20, description="optimizer steps on the 2000-2015 speeches")
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 2e-4
    warmup_steps: int = 2
    seed: int = 0
    methods: list[str] = Field(default=[], description="finetune only these methods (empty: all)")
    budgets: list[float] = Field(default=[], description="finetune only these budgets (empty: all)")

    def settings(self) -> FinetuneSettings:
        return FinetuneSettings(
            self.steps,
            self.batch_size,
            self.seq_len,
            self.lr,
            self.warmup_steps,
            self.seed,
            tuple(self.methods),
            tuple(self.budgets),
        )


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
    decomposed_model: DecomposedHandle,
    warehouse: WarehouseResource,
    artifacts: ArtifactStoreResource,
    models: ModelSource,
    compute: ComputeDevice,
) -> dg.Output[FinetunedHandle]:
    ctx = stage_context(context, warehouse, artifacts, models, compute)
    handle = run_finetuning(ctx, base_model, decomposed_model, config.settings())
    return dg.Output(
        handle,
        data_version=dg.DataVersion("-".join(a.run_key for a in handle.items) or "none"),
        metadata={
            "final_loss": dg.MetadataValue.json(
                {f"{a.method}@{a.budget:g}": round(a.final_loss, 4) for a in handle.items}
            ),
            "paths": dg.MetadataValue.json(
                {
                    f"{a.method}@{a.budget:g}": str(
                        ctx.store.get(ASSET, handle.model, a.run_key, verify=False).path
                    )
                    for a in handle.items
                }
            ),
        },
    )


@dg.asset_check(asset=finetuned_adapters, description="Every adapter finished training with a finite loss.")
def training_loss_finite(finetuned_adapters: FinetunedHandle) -> dg.AssetCheckResult:
    bad = [f"{a.method}@{a.budget:g}" for a in finetuned_adapters.items if not math.isfinite(a.final_loss)]
    return dg.AssetCheckResult(
        passed=not bad,
        metadata={"adapters": len(finetuned_adapters.items), "bad": dg.MetadataValue.json(bad)},
    )
