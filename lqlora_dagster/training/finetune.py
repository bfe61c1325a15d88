"""The finetuning loop: AdamW on the trainable factors, cosine LR with warmup,
gradient accumulation, deterministic batches per step, resumable checkpoints, and a
validation loss every few steps that keeps the best adapter and stops early when it
stops improving.

Batches come from `batch_fn(step, micro)`, a pure function of the step, so a resumed
run sees exactly the batches the interrupted one would have seen.
"""

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.knobs import check_knobs, knob
from lqlora_dagster.training.state import load_best, load_state, save_best, save_state

BatchFn = Callable[[int, int], dict[str, torch.Tensor]]


class TrainingDiverged(LQLoRAInputError):
    """The loss stopped being finite: the learning rate is too high for this model."""


@dataclass(frozen=True)
class TrainSettings:
    """Knobs of the finetuning loop (each a launchpad field and a CLI flag)."""

    steps: int = knob(20, "optimizer steps (at most, with `epochs`)", ge=1, flags=("--steps",))
    epochs: float = knob(0.0, "stop after this many passes over the training examples (0: run `steps`)", ge=0)
    batch_size: int = knob(4, "examples per micro-batch", ge=1)
    grad_accum: int = knob(1, "micro-batches per optimizer step", ge=1)
    lr: float = knob(2e-4, "peak learning rate (AdamW)", gt=0, lt=1, flags=("--lr",))
    warmup_steps: int = knob(2, "steps of linear warmup before the cosine decay", ge=0)
    weight_decay: float = knob(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = knob(1.0, "clip gradients to this norm (0: no clipping)", ge=0)
    seed: int = knob(0, "seed of the batch order and of fresh LoRA factors")
    checkpoint_every: int = knob(5, "steps between resumable checkpoints (0: only at the end)", ge=0)
    eval_every: int = knob(5, "steps between validation losses (0: no validation; the last adapter is kept)", ge=0)
    patience: int = knob(0, "stop after this many validations without a better loss (0: never stop early)", ge=0)
    gradient_checkpointing: bool = knob(
        False, "recompute each block's activations in backward: far less memory for about a third more compute"
    )

    def __post_init__(self) -> None:
        check_knobs(self)

    def planned_steps(self, n_examples: int) -> int:
        """`steps`, or fewer when `epochs` of `n_examples` are done sooner."""
        if not self.epochs:
            return self.steps
        per_step = self.batch_size * self.grad_accum
        return max(1, min(self.steps, math.ceil(self.epochs * n_examples / per_step)))

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing of every transformer block (transformers' own), non-reentrant
    so frozen inputs and LQLinear's custom backward work; the KV cache is off while training."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LQLoRAInputError(
            f"{type(model).__name__} does not support gradient checkpointing; drop --finetune-gradient-checkpointing"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers' newer name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


@dataclass(frozen=True)
class TrainStep:
    step: int  # 1-based
    loss: float
    lr: float
    seconds: float
    val_loss: float | None = None  # on the steps that validated


def cosine_lr(step: int, settings: TrainSettings) -> float:
    """LR multiplier for 0-based optimizer step `step`: linear warmup, cosine to 0."""
    if step < settings.warmup_steps:
        return (step + 1) / (settings.warmup_steps + 1)
    span = max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * (step - settings.warmup_steps) / span))


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def finetune(
    model: torch.nn.Module,
    batch_fn: BatchFn,
    settings: TrainSettings,
    *,
    validate: Callable[[torch.nn.Module], float] | None = None,
    checkpoint_dir: Path | None = None,
    on_step: Callable[[TrainStep], None] | None = None,
    stop_after: int | None = None,
) -> list[TrainStep]:
    """Train the parameters that require grad. Returns one TrainStep per step run in
    this call (a resumed run returns the earlier steps too, from the checkpoint).

    With `validate` (model -> mean validation loss) and `eval_every`, the loss is taken
    every `eval_every` steps and at the end; the model returned holds the trainable
    values of the best validation, and training stops after `patience` validations
    without improvement. `stop_after` ends the call early after that many steps (for
    tests and time limits)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LQLoRAInputError("nothing to train: no parameter requires grad (call mark_trainable first)")
    set_seed(settings.seed)
    if settings.gradient_checkpointing:
        enable_checkpointing(model)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    validating = validate is not None and settings.eval_every > 0

    history: list[TrainStep] = []
    start = 0
    best: dict[str, torch.Tensor] | None = None
    if checkpoint_dir is not None:
        meta = load_state(checkpoint_dir, accelerator.unwrap_model(model), inner)
        if meta is not None and meta.get("settings") == settings.fingerprint():
            start = int(meta["step"])
            history = [TrainStep(**h) for h in meta.get("history", [])]
            best = load_best(checkpoint_dir)
    end = settings.steps if stop_after is None else min(settings.steps, start + stop_after)
    if validating and settings.patience and _stale(history) >= settings.patience:
        end = start  # a resumed run that had already stopped early
    model.train()
    bar = tqdm(range(start, end), initial=start, total=settings.steps, desc="finetune", disable=None)
    for step in bar:
        t0 = time.perf_counter()
        lr = settings.lr * cosine_lr(step, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for micro in range(settings.grad_accum):
            batch = {k: v.to(accelerator.device) for k, v in batch_fn(step, micro).items()}
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"training loss became {loss.item()} at step {step + 1}; lower the learning rate"
                )
            accelerator.backward(loss / settings.grad_accum)
            total += loss.item() / settings.grad_accum
        if settings.max_grad_norm:
            accelerator.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        val = None
        if validating and (done % settings.eval_every == 0 or done == settings.steps):
            val = float(validate(accelerator.unwrap_model(model)))
            model.train()
            if val <= min((h.val_loss for h in history if h.val_loss is not None), default=math.inf):
                best = _trainable_state(accelerator.unwrap_model(model))
                if checkpoint_dir is not None:
                    save_best(checkpoint_dir, best)
        record = TrainStep(done, total, lr, time.perf_counter() - t0, val)
        history.append(record)
        bar.set_postfix(loss=f"{total:.4f}")
        if on_step is not None:
            on_step(record)
        stop = validating and settings.patience and _stale(history) >= settings.patience
        every = settings.checkpoint_every
        if checkpoint_dir is not None and (done == end or stop or (every and done % every == 0)):
            meta = {"settings": settings.fingerprint(), "history": [asdict(h) for h in history]}
            save_state(checkpoint_dir, accelerator.unwrap_model(model), inner, done, meta)
        if stop:
            break
    model.eval()
    early = bool(validating and settings.patience and _stale(history) >= settings.patience)
    if best is not None and history and (history[-1].step == settings.steps or early):
        with torch.no_grad():
            for name, p in accelerator.unwrap_model(model).named_parameters():
                if name in best:
                    p.copy_(best[name])
    return history


def _stale(history: list[TrainStep]) -> int:
    """Validations since the best one."""
    vals = [h.val_loss for h in history if h.val_loss is not None]
    return 0 if not vals else len(vals) - 1 - vals.index(min(vals))


def best_step(history: list[TrainStep]) -> int | None:
    """The step whose validation loss was lowest (the adapter kept), or None."""
    vals = [(h.val_loss, h.step) for h in history if h.val_loss is not None]
    return min(vals)[1] if vals else None


def example_batches(examples: dict[str, torch.Tensor], settings: TrainSettings) -> BatchFn:
    """Batches of examples (rows of every tensor), shuffled once by the seed, wrapping
    around; token windows without `labels` learn every next token."""
    n = len(examples["input_ids"])
    if n == 0 or examples["input_ids"].dim() != 2:
        raise LQLoRAInputError("training needs at least one example of tokens")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed))

    def batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        first = (step * settings.grad_accum + micro) * settings.batch_size
        idx = order[torch.arange(first, first + settings.batch_size) % n]
        out = {k: v[idx] for k, v in examples.items()}
        out.setdefault("labels", out["input_ids"])
        return out

    return batch
