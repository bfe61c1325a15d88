"""The finetuning loop: AdamW on the trainable factors, cosine LR with warmup,
gradient accumulation, deterministic batches per step, resumable checkpoints.

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
from tqdm.auto import tqdm

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.knobs import check_knobs, knob
from lqlora_dagster.training.state import load_state, save_state

BatchFn = Callable[[int, int], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class TrainSettings:
    """Knobs of the finetuning loop (each a launchpad field and a CLI flag)."""

    steps: int = knob(20, "optimizer steps", ge=1, flags=("--steps",))
    batch_size: int = knob(4, "examples per micro-batch", ge=1)
    grad_accum: int = knob(1, "micro-batches per optimizer step", ge=1)
    lr: float = knob(2e-4, "peak learning rate (AdamW)", gt=0, lt=1, flags=("--lr",))
    warmup_steps: int = knob(2, "steps of linear warmup before the cosine decay", ge=0)
    weight_decay: float = knob(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = knob(1.0, "clip gradients to this norm (0: no clipping)", ge=0)
    seed: int = knob(0, "seed of the batch order and of fresh LoRA factors")
    checkpoint_every: int = knob(5, "steps between resumable checkpoints (0: only at the end)", ge=0)

    def __post_init__(self) -> None:
        check_knobs(self)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TrainStep:
    step: int  # 1-based
    loss: float
    lr: float
    seconds: float


def cosine_lr(step: int, settings: TrainSettings) -> float:
    """LR multiplier for 0-based optimizer step `step`: linear warmup, cosine to 0."""
    if step < settings.warmup_steps:
        return (step + 1) / (settings.warmup_steps + 1)
    span = max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * (step - settings.warmup_steps) / span))


def finetune(
    model: torch.nn.Module,
    batch_fn: BatchFn,
    settings: TrainSettings,
    *,
    checkpoint_dir: Path | None = None,
    on_step: Callable[[TrainStep], None] | None = None,
    stop_after: int | None = None,
) -> list[TrainStep]:
    """Train the parameters that require grad. Returns one TrainStep per step run in
    this call (a resumed run returns the earlier steps too, from the checkpoint).
    `stop_after` ends the call early after that many steps (for tests and time limits)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LQLoRAInputError("nothing to train: no parameter requires grad (call mark_trainable first)")
    set_seed(settings.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer

    history: list[TrainStep] = []
    start = 0
    if checkpoint_dir is not None:
        meta = load_state(checkpoint_dir, accelerator.unwrap_model(model), inner)
        if meta is not None and meta.get("settings") == settings.fingerprint():
            start = int(meta["step"])
            history = [TrainStep(**h) for h in meta.get("history", [])]
    end = settings.steps if stop_after is None else min(settings.steps, start + stop_after)
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
                raise LQLoRAInputError(
                    f"training loss became {loss.item()} at step {step + 1}; lower the learning rate"
                )
            accelerator.backward(loss / settings.grad_accum)
            total += loss.item() / settings.grad_accum
        if settings.max_grad_norm:
            accelerator.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = TrainStep(step + 1, total, lr, time.perf_counter() - t0)
        history.append(record)
        bar.set_postfix(loss=f"{total:.4f}")
        if on_step is not None:
            on_step(record)
        done = step + 1
        every = settings.checkpoint_every
        if checkpoint_dir is not None and (done == end or (every and done % every == 0)):
            meta = {"settings": settings.fingerprint(), "history": [asdict(h) for h in history]}
            save_state(checkpoint_dir, accelerator.unwrap_model(model), inner, done, meta)
    model.eval()
    return history


def causal_lm_batches(windows: torch.Tensor, settings: TrainSettings) -> BatchFn:
    """Batches of token windows in a fixed order, wrapping around; labels = inputs."""
    if windows.dim() != 2 or len(windows) == 0:
        raise LQLoRAInputError("training needs at least one window of tokens")

    def batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        first = (step * settings.grad_accum + micro) * settings.batch_size
        idx = torch.arange(first, first + settings.batch_size) % len(windows)
        ids = windows[idx]
        return {"input_ids": ids, "labels": ids}

    return batch


def classification_batches(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, settings: TrainSettings
) -> BatchFn:
    """Batches of (padded) sentences, shuffled once by the seed, wrapping around."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(settings.seed))

    def batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        first = (step * settings.grad_accum + micro) * settings.batch_size
        idx = order[torch.arange(first, first + settings.batch_size) % len(labels)]
        return {"input_ids": input_ids[idx], "attention_mask": attention_mask[idx], "labels": labels[idx]}

    return batch
