"""Budgets no plan can meet, refused before any work: the cheapest plan of a method
follows from the target shapes and its candidate configs alone (every matrix at its
cheapest config for the ILP, the cheapest single config for a uniform method)."""

from pathlib import Path

import torch

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.methods import get_method
from lqlora_dagster.models.source import resolve_model_folder
from lqlora_dagster.models.targets import find_targets
from lqlora_dagster.pipeline.registry import lookup_model
from lqlora_dagster.pipeline.settings import PipelineSettings
from lqlora_dagster.quant.config import storage_bits
from lqlora_dagster.store.warehouse import Warehouse
from lqlora_dagster.tasks import get_task


def target_sizes(warehouse: Warehouse, model: str, cache: Path) -> list[int]:
    """Weights per target matrix: as `base_model` recorded them, or else from the model's
    module tree built on the meta device (no weight is read or allocated)."""
    rows = warehouse.query("SELECT numel FROM matrices WHERE model = ?", [model])
    if not rows.empty:
        return [int(n) for n in rows["numel"]]
    from transformers import AutoConfig

    record = lookup_model(warehouse, model)
    folder, task = resolve_model_folder(record["source"], cache)
    with torch.device("meta"):
        net = get_task(task).from_config(AutoConfig.from_pretrained(folder))
    return [t.numel for t in find_targets(net, record["pattern"])]


def cheapest_bits(method: str, sizes: list[int], settings: PipelineSettings) -> float:
    configs = get_method(method).candidate_configs(settings.error_table.configs)
    total = sum(sizes)
    if get_method(method).ilp:
        return sum(min(storage_bits(n, c) for c in configs) for n in sizes) / total
    return min(sum(storage_bits(n, c) for n in sizes) for c in configs) / total


def check_budgets(sizes: list[int], settings: PipelineSettings, model: str) -> None:
    """Every (method, budget) of a run meets at least the method's cheapest plan."""
    for method in settings.error_table.methods:
        floor = cheapest_bits(method, sizes, settings)
        low = [b for b in settings.allocation_plan.budgets_for(method) if b < floor - 1e-12]
        if low:
            raise LQLoRAInputError(
                f"budget {min(low):g} bits/param is below the cheapest plan of {method} on {model!r}, "
                f"{floor:.4f} bits/param ({settings.error_table.grid} grid); raise the budget to at least "
                f"{int(floor * 1000 + 1) / 1000:.3f}"
            )
