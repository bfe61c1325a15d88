"""Options no run can honour, refused before any work: budgets and ranks no plan can
meet, lengths beyond the model's positions, finetuning selections that name no plan.

The cheapest plan of a method follows from the target shapes and its candidates alone
(every matrix at its cheapest config and rank for the ILP, the cheapest single
(config, rank) for a uniform method); a total size must also leave room above the
tensors that are not targets, which the checkpoint's headers tell without loading.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from lqlora_dagster.allocate.budget import Budget, capacity, factor_bits
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.methods import get_method
from lqlora_dagster.models.positions import context_length
from lqlora_dagster.models.source import resolve_model_folder
from lqlora_dagster.models.targets import Target, find_targets
from lqlora_dagster.models.weights import nontarget_bytes
from lqlora_dagster.pipeline.registry import lookup_model
from lqlora_dagster.pipeline.settings import PipelineSettings
from lqlora_dagster.quant.config import storage_bits
from lqlora_dagster.store.warehouse import Warehouse
from lqlora_dagster.tasks import get_task


@dataclass(frozen=True)
class ModelShape:
    """What the checks need of a model: its targets' shapes and the bytes of the rest."""

    shapes: list[tuple[int, int]]  # (rows, cols) per target
    nontarget_bytes: int
    positions: int | None = None  # the longest sequence the model attends to (None: not stated)

    @property
    def target_numel(self) -> int:
        return sum(r * c for r, c in self.shapes)


def model_shape(warehouse: Warehouse, model: str, cache: Path) -> ModelShape:
    """Target shapes as `base_model` recorded them, or else from the model's module tree
    built on the meta device; no weight is read or allocated."""
    # transformers loads on first use (0.6 s): commands that read no model skip it
    from transformers import AutoConfig

    record = lookup_model(warehouse, model)
    folder, task = resolve_model_folder(record["source"], cache)
    config = AutoConfig.from_pretrained(folder)
    rows = warehouse.query("SELECT name, rows, cols, layer, kind, transposed FROM matrices WHERE model = ?", [model])
    if not rows.empty:
        targets = [Target(r.name, int(r.rows), int(r.cols), int(r.layer), r.kind, bool(r.transposed))
                   for r in rows.itertuples()]
    else:
        with torch.device("meta"):
            net = get_task(task).from_config(config)
        targets = find_targets(net, record["pattern"])
    return ModelShape([(t.rows, t.cols) for t in targets], nontarget_bytes(folder, targets), context_length(config))


def check_lengths(shape: ModelShape, settings: PipelineSettings, model: str) -> None:
    """Every window a run cuts fits the model's positions (beyond them a model with
    learned positions fails mid-run, and a rotary one scores text it was never trained on)."""
    if shape.positions is None:
        return
    lengths = {
        "--calibration-len": settings.calibration_batches.seq_len,
        "--finetune-len": settings.finetuned_adapters.seq_len,
        "--eval-len": settings.evaluation.seq_len,
    }
    for flag, length in lengths.items():
        if length > shape.positions:
            raise LQLoRAInputError(
                f"{flag} {length} is longer than {model!r} can attend to ({shape.positions} positions); "
                f"use at most {flag} {shape.positions}"
            )


def check_finetune_selection(settings: PipelineSettings) -> None:
    """`--finetune-methods` / `--finetune-budgets` name plans this run makes; otherwise
    they select nothing and the run would finetune nothing."""
    planned = settings.error_table.methods
    chosen = settings.finetuned_adapters
    stray = [m for m in chosen.methods if m not in planned]
    if stray:
        raise LQLoRAInputError(
            f"--finetune-methods {' '.join(stray)}: not planned in this run (planned: {' '.join(planned)}); "
            f"add it to --methods or leave it out of --finetune-methods"
        )
    budgets = sorted({b.value for m in (chosen.methods or planned) for b in settings.allocation_plan.budgets_for(m)})
    missing = [b for b in chosen.budgets if not any(abs(b - v) < 1e-9 for v in budgets)]
    if missing:
        raise LQLoRAInputError(
            f"--finetune-budgets {' '.join(f'{b:g}' for b in missing)}: no plan of this run has that budget "
            f"(its budgets: {' '.join(f'{b:g}' for b in budgets)}); pick among them or add it to --budget"
        )


def check_ranks(shape: ModelShape, settings: PipelineSettings, model: str) -> None:
    """Every rank a run decomposes at fits under every target: rank < min(rows, cols)."""
    ranks = {settings.error_table.rank, *settings.error_table.ranks}
    thinnest = min(min(r, c) for r, c in shape.shapes)
    too_big = sorted(r for r in ranks if r >= thinnest)
    if too_big:
        raise LQLoRAInputError(
            f"rank {too_big[-1]} is too large for {model!r}: its thinnest target matrix is {thinnest} wide, so a "
            f"rank must be below {thinnest}; lower `rank`/`ranks`"
        )


def cheapest(method: str, shape: ModelShape, settings: PipelineSettings, budget: Budget) -> float:
    """The least storage any plan of `method` takes, in bits per target weight as the
    budget counts it."""
    m = get_method(method)
    configs = m.candidate_configs(settings.error_table.configs)
    ranks = settings.error_table.ranks_for(m) if m.has_lowrank_init else (settings.error_table.rank,)
    bits = settings.allocation_plan.factor_bits

    def cost(rows: int, cols: int, config, rank: int) -> float:
        extra = factor_bits(rank, rows, cols, bits) if budget.counts_factors else 0
        return storage_bits(rows * cols, config) + extra

    if m.ilp:
        total = sum(min(cost(r, c, q, k) for q in configs for k in ranks) for r, c in shape.shapes)
    else:
        total = min(sum(cost(r, c, q, k) for r, c in shape.shapes) for q in configs for k in ranks)
    return total / shape.target_numel


def check_budgets(shape: ModelShape, settings: PipelineSettings, model: str) -> None:
    """Every (method, budget) of a run meets at least the method's cheapest plan."""
    for method in settings.error_table.methods:
        for budget in settings.allocation_plan.budgets_for(method):
            cap = capacity(budget, shape.target_numel, shape.nontarget_bytes)
            floor = cheapest(method, shape, settings, budget)
            if cap >= floor - 1e-12:
                continue
            if budget.kind == "total":
                need = shape.nontarget_bytes + floor * shape.target_numel / 8
                raise LQLoRAInputError(
                    f"a total size of {budget.value / 1e6:.2f} MB is below the smallest {method} model of {model!r}, "
                    f"{need / 1e6:.2f} MB: {shape.nontarget_bytes / 1e6:.2f} MB of tensors that are not targets "
                    f"plus the targets at their cheapest; ask for at least {need / 1e6 + 0.01:.2f}MB"
                )
            raise LQLoRAInputError(
                f"budget {budget.describe()} is below the cheapest plan of {method} on {model!r}, "
                f"{floor:.4f} bits/param ({settings.error_table.grid} grid); raise the budget to at least "
                f"{int(floor * 1000 + 1) / 1000:.3f}"
            )


def check_run(shape: ModelShape, settings: PipelineSettings, model: str) -> None:
    """Every check a run's options get before any work starts."""
    check_lengths(shape, settings, model)
    check_ranks(shape, settings, model)
    check_budgets(shape, settings, model)
    check_finetune_selection(settings)
