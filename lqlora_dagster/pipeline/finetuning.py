"""Stage `finetuned_adapters`: train L1, L2 of each decomposed model (and a
classifier's fresh head) on the task's training examples; export PEFT adapters; log
every step to DuckDB `train_steps`.

Training checkpoints go to LQLORA_HOME/checkpoints/<run key>, so a killed run
resumes from its last checkpoint instead of from step 0.
"""

import shutil
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from lqlora_dagster.models.loading import load_tokenizer
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.decomposition import ASSET as DECOMPOSED
from lqlora_dagster.pipeline.handles import AdapterRef, DecomposedHandle, FinetunedHandle, ModelHandle
from lqlora_dagster.pipeline.settings import FinetuneSettings
from lqlora_dagster.store.keys import stable_key
from lqlora_dagster.store.schemas import TRAIN_STEPS
from lqlora_dagster.surgery.export import export_peft_adapter
from lqlora_dagster.surgery.injector import lq_layers, mark_trainable
from lqlora_dagster.surgery.lq_model_io import load_lq_model
from lqlora_dagster.tasks import get_task
from lqlora_dagster.training.finetune import finetune
from lqlora_dagster.training.state import checkpoint_step

FINETUNE_VERSION = "1"
ASSET = "finetuned_adapters"


def run_finetuning(
    ctx: StageContext, model: ModelHandle, decomposed: DecomposedHandle, s: FinetuneSettings
) -> FinetunedHandle:
    items = []
    examples = None
    for ref in decomposed.items:
        if not s.selects(ref.method, ref.budget):
            continue
        run_key = stable_key(ref.decomp_key, asdict(s) | {"methods": None, "budgets": None}, FINETUNE_VERSION)
        art = ctx.store.find(ASSET, model.model, run_key)
        if art is None:
            if examples is None:
                examples = get_task(model.task).training_examples(load_tokenizer(Path(model.folder)), s)
            art = _train(ctx, model, ref, s, run_key, examples)
        else:
            ctx.log(f"finetune {ref.method} @ {ref.budget:g}: cached")
        losses = ctx.warehouse.query(
            "SELECT loss FROM train_steps WHERE run = ? ORDER BY step DESC LIMIT 1", [run_key]
        )
        final = float(losses["loss"].iloc[0]) if not losses.empty else float("nan")
        items.append(AdapterRef(ref.plan_id, ref.method, ref.budget, ref.decomp_key, run_key, final))
    return FinetunedHandle(model.model, items)


def _train(ctx, model, ref, s: FinetuneSettings, run_key, examples):
    task = get_task(model.task)
    lq = load_lq_model(ctx.store.get(DECOMPOSED, model.model, ref.decomp_key).path, ctx.device)
    head = task.head(lq)
    mark_trainable(lq, head=head)
    checkpoint = ctx.checkpoints / run_key

    resumed = checkpoint_step(checkpoint)
    if resumed is not None:
        ctx.log(f"finetune {ref.method} @ {ref.budget:g}: resuming from the checkpoint at step {resumed}")

    def on_step(step) -> None:
        ctx.progress(f"finetune {ref.method} @ {ref.budget:g}", step.step, s.steps, "steps", f"loss {step.loss:.4f}")

    history = finetune(lq, task.batches(examples, s), s, checkpoint_dir=checkpoint, on_step=on_step)
    frame = pd.DataFrame(
        [
            {
                "run": run_key,
                "plan_id": ref.plan_id,
                "step": h.step,
                "loss": h.loss,
                "lr": h.lr,
                "seconds": h.seconds,
            }
            for h in history
        ]
    )
    ctx.warehouse.replace_rows("train_steps", TRAIN_STEPS.validate(frame), {"run": run_key})
    art = ctx.store.save_folder(
        ASSET, model.model, run_key, lambda d: export_peft_adapter(lq.cpu(), d, model.folder, model.task, head)
    )
    shutil.rmtree(checkpoint, ignore_errors=True)  # the adapter is committed; the checkpoint is spent
    return art


def load_finetuned(
    ctx: StageContext, model: ModelHandle, ref: AdapterRef, device: torch.device | str = "cpu"
):
    """The decomposed model with the trained factors from the PEFT adapter put back."""
    lq = load_lq_model(ctx.store.get(DECOMPOSED, model.model, ref.decomp_key).path, device)
    adapter = ctx.store.get(ASSET, model.model, ref.run_key)
    tensors = load_file(str(adapter.path / "adapter_model.safetensors"))
    with torch.no_grad():
        for name, layer in lq_layers(lq).items():
            layer.L2.copy_(tensors[f"base_model.model.{name}.lora_A.weight"])
            layer.L1.copy_(tensors[f"base_model.model.{name}.lora_B.weight"])
        head = get_task(model.task).head(lq)
        if head is not None:  # the trained head travels with the adapter (PEFT modules_to_save)
            for pname, p in lq.get_submodule(head).named_parameters():
                p.copy_(tensors[f"base_model.model.{head}.{pname}"])
    return lq
