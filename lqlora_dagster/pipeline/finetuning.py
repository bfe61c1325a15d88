"""Stage `finetuned_adapters`: train L1, L2 of each decomposed model (and a
classifier's fresh head) on the train part of the run's data, validating on its val
part every few steps and keeping the best adapter; export PEFT adapters; log every
step (and each validation loss) to DuckDB `train_steps`. With `lr_grid` each adapter
is trained once per rate (each run its own key, so a rate shared with an earlier run
is not trained twice) and the run with the lowest validation loss is the one handed on.

Training checkpoints go to LQLORA_HOME/checkpoints/<run key>, so a killed run
resumes from its last checkpoint instead of from step 0.
"""

import dataclasses
import math
import shutil
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from lqlora_dagster.data.selection import TaskData
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.models.loading import load_tokenizer
from lqlora_dagster.pipeline.base_model_stage import load_with_targets
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.decomposition import ASSET as DECOMPOSED
from lqlora_dagster.pipeline.handles import AdapterRef, DecomposedHandle, FinetunedHandle, ModelHandle
from lqlora_dagster.pipeline.settings import FinetuneSettings
from lqlora_dagster.store.keys import stable_key
from lqlora_dagster.store.schemas import TRAIN_STEPS
from lqlora_dagster.surgery.injector import factor_layers, mark_trainable
from lqlora_dagster.surgery.lora_linear import add_lora
from lqlora_dagster.surgery.lq_model_io import load_lq_model
from lqlora_dagster.surgery.peft_adapter import export_peft_adapter
from lqlora_dagster.tasks import get_task, task_of_data
from lqlora_dagster.training.finetune import TrainingDiverged, best_step, finetune
from lqlora_dagster.training.state import checkpoint_step

FINETUNE_VERSION = "2"
ASSET = "finetuned_adapters"
REFERENCE_SEED = 0  # draws the reference LoRA's L2, as PEFT draws lora_A


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


REFERENCE = "reference"  # method and plan_id of the uncompressed model's LoRA


def label(ref) -> str:
    return REFERENCE if ref.budget is None else f"{ref.method} @ {ref.budget:g}"


def run_finetuning(
    ctx: StageContext, model: ModelHandle, decomposed: DecomposedHandle, data: TaskData, s: FinetuneSettings
) -> FinetunedHandle:
    """One adapter per selected decomposition, then the reference LoRA at the same rank;
    with `lr_grid`, one run per rate each, keeping the lowest validation loss."""
    data_ids = (data.content_id("train"), data.content_id("val"))
    selected = [ref for ref in decomposed.items if s.selects(ref.method, ref.budget)]
    for ref in selected:
        if ref.rank == 0:
            ctx.log(f"finetune {label(ref)}: its plan gave every matrix rank 0, so it has no factors to train; "
                    "skipped (its before-finetune evaluation stands)")
    adapters = [
        (AdapterRef(ref.plan_id, ref.method, ref.budget, ref.decomp_key, "", rank=ref.rank),
         lambda lr, ref=ref: stable_key(ref.decomp_key, s.recipe(lr), *data_ids, FINETUNE_VERSION))
        for ref in selected if ref.rank > 0
    ]
    ranks = {ref.rank for ref in selected if ref.rank > 0}
    if s.reference and ranks:
        rank = max(ranks)
        adapters.append((AdapterRef(REFERENCE, REFERENCE, None, model.key, "", rank=rank),
                         lambda lr: stable_key(model.key, "lora", rank, s.recipe(lr), *data_ids, FINETUNE_VERSION)))
    examples = _Examples(model, data, s, ctx.log)
    items = []
    for ref, key_at in adapters:
        tried = []
        for lr in s.learning_rates():
            run_key = key_at(lr)
            tag = label(ref) + (f" (lr {lr:g})" if s.lr_grid else "")
            if ctx.store.find(ASSET, model.model, run_key) is None:
                try:
                    _train(ctx, model, ref, tag, data, dataclasses.replace(s, lr=lr, lr_grid=()), run_key,
                           examples.get())
                except TrainingDiverged as exc:
                    if not s.lr_grid:
                        raise
                    ctx.log(f"finetune {tag}: {exc}; not a candidate")
                    continue
            else:
                ctx.log(f"finetune {tag}: cached")
            tried.append(_outcome(ctx, ref, run_key, lr))
        if not tried:
            raise TrainingDiverged(f"finetune {label(ref)}: training diverged at every rate of lr_grid "
                                   f"{list(s.lr_grid)}; try lower ones")
        chosen = min(tried, key=_validation_rank)
        if s.lr_grid:
            losses = ", ".join(f"{t.lr:g}: {_loss_text(t.best_val_loss)}" for t in tried)
            ctx.log(f"finetune {label(ref)}: lr {chosen.lr:g} kept (best validation loss per lr: {losses})")
        items.append(chosen)
    return FinetunedHandle(model.model, items)


def _outcome(ctx: StageContext, ref: AdapterRef, run_key: str, lr: float) -> AdapterRef:
    """`ref` with what its run at `lr` recorded in `train_steps`."""
    steps = ctx.warehouse.query("SELECT step, loss, val_loss FROM train_steps WHERE run = ? ORDER BY step", [run_key])
    final = float(steps["loss"].iloc[-1]) if not steps.empty else float("nan")
    vals = steps.dropna(subset=["val_loss"])
    best = vals.loc[vals["val_loss"].idxmin()] if not vals.empty else None
    return dataclasses.replace(
        ref, run_key=run_key, final_loss=final, best_step=None if best is None else int(best["step"]),
        best_val_loss=None if best is None else float(best["val_loss"]), lr=lr,
    )


def _loss_text(loss: float | None) -> str:
    return "none" if loss is None else f"{loss:.4f}"


def _validation_rank(ref: AdapterRef) -> tuple[bool, float]:
    """Lowest best validation loss first; runs that never validated (or diverged) last."""
    loss = ref.best_val_loss
    bad = loss is None or not math.isfinite(loss)
    return bad, ref.final_loss if bad else loss


def trainable_model(ctx: StageContext, model: ModelHandle, ref: AdapterRef, labels, device) -> torch.nn.Module:
    """What an adapter trains on: the decomposed model, or for the reference the base
    model with LoRA factors (L1 = 0) on the same targets at the same rank."""
    kind = get_task(model.task)
    if ref.plan_id == REFERENCE:
        base, targets = load_with_targets(model, device)
        net = add_lora(base, [t.name for t in targets], ref.rank, seed=REFERENCE_SEED)
    else:
        net = load_lq_model(ctx.store.get(DECOMPOSED, model.model, ref.decomp_key).path, device)
    return kind.fit_head(net, labels)


def _train(ctx, model, ref, tag: str, data: TaskData, s: FinetuneSettings, run_key, examples):
    train, val = examples
    task, kind = task_of_data(data.task), get_task(model.task)
    net = trainable_model(ctx, model, ref, data.labels, ctx.device)
    head = kind.head(net)
    mark_trainable(net, head=head)
    checkpoint = ctx.checkpoints / run_key
    settings = dataclasses.replace(s, steps=s.planned_steps(len(train["input_ids"])))

    resumed = checkpoint_step(checkpoint)
    if resumed is not None:
        ctx.log(f"finetune {tag}: resuming from the checkpoint at step {resumed}")

    def on_step(step) -> None:
        note = f"loss {step.loss:.4f}" + (f", val {step.val_loss:.4f}" if step.val_loss is not None else "")
        ctx.progress(f"finetune {tag}", step.step, settings.steps, "steps", note)

    history = finetune(
        net, task.batches(train, settings), settings, checkpoint_dir=checkpoint, on_step=on_step,
        validate=lambda m: task.loss(m, val, s.batch_size),
    )
    best = best_step(history)
    if best is not None and best != history[-1].step:
        ctx.log(f"finetune {tag}: kept the adapter of step {best} (lowest validation loss)")
    frame = pd.DataFrame(
        [
            {"run": run_key, "plan_id": ref.plan_id, "step": h.step, "loss": h.loss, "lr": h.lr,
             "seconds": h.seconds, "val_loss": h.val_loss}
            for h in history
        ]
    )
    ctx.warehouse.replace_rows("train_steps", TRAIN_STEPS.validate(frame), {"run": run_key})
    art = ctx.store.save_folder(
        ASSET, model.model, run_key, lambda d: export_peft_adapter(net.cpu(), d, model.folder, model.task, head)
    )
    shutil.rmtree(checkpoint, ignore_errors=True)  # the adapter is committed; the checkpoint is spent
    return art


def load_finetuned(
    ctx: StageContext, model: ModelHandle, ref: AdapterRef, labels: tuple[str, ...] = (), device: torch.device | str = "cpu"
):
    """The trained model: its base (decomposed, or dense for the reference) with the
    factors (and head) from the PEFT adapter put back."""
    net = trainable_model(ctx, model, ref, labels, device)
    adapter = ctx.store.get(ASSET, model.model, ref.run_key)
    tensors = load_file(str(adapter.path / "adapter_model.safetensors"))
    with torch.no_grad():
        for name, layer in factor_layers(net).items():
            if layer.rank == 0:  # no factors, no adapter (export leaves it out)
                continue
            layer.L2.copy_(tensors[f"base_model.model.{name}.lora_A.weight"])
            layer.L1.copy_(tensors[f"base_model.model.{name}.lora_B.weight"])
        head = get_task(model.task).head(net)
        if head is not None:  # the trained head travels with the adapter (PEFT modules_to_save)
            for pname, p in net.get_submodule(head).named_parameters():
                p.copy_(tensors[f"base_model.model.{head}.{pname}"])
    return net.eval()


def pick_adapter(adapters: FinetunedHandle, method: str | None, budget: float | None) -> AdapterRef:
    """The adapter of a method (and budget); the first one trained when neither is given."""
    found = [a for a in adapters.items if (method is None or a.method == method)
             and (budget is None or (a.budget is not None and abs(a.budget - budget) < 1e-9))]
    if not found:
        have = ", ".join(label(a) for a in adapters.items) or "none"
        raise LQLoRAInputError(
            f"no finetuned adapter for {method or 'any method'}{f' @ {budget:g}' if budget else ''} "
            f"(trained: {have}); run `lqlora run` with that method and budget first"
        )
    return found[0]
