"""Stage `finetuned_adapters`: train L1, L2 of each decomposed model (and a
classifier's fresh head) on the train part of the run's data, validating on its val
part every few steps and keeping the best adapter; export PEFT adapters; log every
step (and each validation loss) to DuckDB `train_steps`.

Training checkpoints go to LQLORA_HOME/checkpoints/<run key>, so a killed run
resumes from its last checkpoint instead of from step 0.
"""

import dataclasses
import shutil
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from lqlora_dagster.data.selection import TaskData
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
from lqlora_dagster.tasks import get_task, task_of_data
from lqlora_dagster.training.finetune import best_step, finetune
from lqlora_dagster.training.state import checkpoint_step

FINETUNE_VERSION = "2"
ASSET = "finetuned_adapters"


def spread(tensors: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """At most `n` examples, spread evenly over the set (all when it holds fewer)."""
    available = len(tensors["input_ids"])
    if available <= n:
        return tensors
    pick = torch.linspace(0, available - 1, n).round().long()
    return {k: v[pick] for k, v in tensors.items()}


@dataclasses.dataclass
class _Examples:
    """The train and val tensors, built on first use and shared by every method's run."""

    model: ModelHandle
    data: TaskData
    s: FinetuneSettings
    log: object
    built: tuple | None = None

    def get(self) -> tuple[dict, dict]:
        if self.built is None:
            task, tok = task_of_data(self.data.task), load_tokenizer(Path(self.model.folder))
            train = task.examples(tok, self.data, "train", self.s.seq_len)
            val = task.examples(tok, self.data, "val", self.s.seq_len)
            if train.truncated:
                self.log(f"finetune: {train.truncated} of {len(train.tensors['input_ids'])} training rows were longer "
                         f"than {self.s.seq_len} tokens and were cut (--finetune-len)")
            self.built = (train.tensors, spread(val.tensors, self.s.val_examples))
        return self.built


def run_finetuning(
    ctx: StageContext, model: ModelHandle, decomposed: DecomposedHandle, data: TaskData, s: FinetuneSettings
) -> FinetunedHandle:
    items = []
    examples = _Examples(model, data, s, ctx.log)
    for ref in decomposed.items:
        if not s.selects(ref.method, ref.budget):
            continue
        recipe = dataclasses.asdict(s) | {"methods": None, "budgets": None}
        run_key = stable_key(ref.decomp_key, recipe, data.content_id("train"), data.content_id("val"), FINETUNE_VERSION)
        art = ctx.store.find(ASSET, model.model, run_key)
        if art is None:
            art = _train(ctx, model, ref, data, s, run_key, examples.get())
        else:
            ctx.log(f"finetune {ref.method} @ {ref.budget:g}: cached")
        steps = ctx.warehouse.query("SELECT step, loss, val_loss FROM train_steps WHERE run = ? ORDER BY step", [run_key])
        final = float(steps["loss"].iloc[-1]) if not steps.empty else float("nan")
        vals = steps.dropna(subset=["val_loss"])
        best = vals.loc[vals["val_loss"].idxmin()] if not vals.empty else None
        items.append(AdapterRef(ref.plan_id, ref.method, ref.budget, ref.decomp_key, run_key, final,
                                None if best is None else int(best["step"]),
                                None if best is None else float(best["val_loss"])))
    return FinetunedHandle(model.model, items)


def _train(ctx, model, ref, data: TaskData, s: FinetuneSettings, run_key, examples):
    train, val = examples
    task = task_of_data(data.task)
    lq = load_lq_model(ctx.store.get(DECOMPOSED, model.model, ref.decomp_key).path, ctx.device)
    kind = get_task(model.task)
    kind.fit_head(lq, data.labels)
    head = kind.head(lq)
    mark_trainable(lq, head=head)
    checkpoint = ctx.checkpoints / run_key
    settings = dataclasses.replace(s, steps=s.planned_steps(len(train["input_ids"])))

    resumed = checkpoint_step(checkpoint)
    if resumed is not None:
        ctx.log(f"finetune {ref.method} @ {ref.budget:g}: resuming from the checkpoint at step {resumed}")

    def on_step(step) -> None:
        note = f"loss {step.loss:.4f}" + (f", val {step.val_loss:.4f}" if step.val_loss is not None else "")
        ctx.progress(f"finetune {ref.method} @ {ref.budget:g}", step.step, settings.steps, "steps", note)

    history = finetune(
        lq, task.batches(train, settings), settings, checkpoint_dir=checkpoint, on_step=on_step,
        validate=lambda net: task.loss(net, val, s.batch_size),
    )
    best = best_step(history)
    if best is not None and best != history[-1].step:
        ctx.log(f"finetune {ref.method} @ {ref.budget:g}: kept the adapter of step {best} (lowest validation loss)")
    frame = pd.DataFrame(
        [
            {"run": run_key, "plan_id": ref.plan_id, "step": h.step, "loss": h.loss, "lr": h.lr,
             "seconds": h.seconds, "val_loss": h.val_loss}
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
    ctx: StageContext, model: ModelHandle, ref: AdapterRef, labels: tuple[str, ...] = (), device: torch.device | str = "cpu"
):
    """The decomposed model with the trained factors (and head) from the PEFT adapter put back."""
    lq = load_lq_model(ctx.store.get(DECOMPOSED, model.model, ref.decomp_key).path, device)
    get_task(model.task).fit_head(lq, labels)
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
