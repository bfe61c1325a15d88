"""Decompose every target matrix of a model by a method and a per-matrix config plan,
and swap in LQLinear layers."""

import time
from collections.abc import Callable

import torch

from lqlora_dagster.decompose.lq import Decomposition, LQSettings
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.methods import Method
from lqlora_dagster.models.targets import Target, target_weight
from lqlora_dagster.per_matrix_threads import matrix_workers, one_thread_per_matrix
from lqlora_dagster.quant.config import QuantConfig
from lqlora_dagster.surgery.injector import LayerInit, replace_with_lq


def decompose_targets(
    model: torch.nn.Module,
    targets: list[Target],
    plan: dict[str, QuantConfig],
    method: Method,
    settings: LQSettings,
    fisher: dict[str, torch.Tensor] | None = None,
    progress: Callable[[int, int, str, float], None] | None = None,
    workers: int | None = None,
    weight_of: Callable[[Target], torch.Tensor] | None = None,
    on_result: Callable[[Target, Decomposition], None] | None = None,
    ranks: dict[str, int] | None = None,
) -> dict[str, Decomposition]:
    """{target name: Decomposition} for every target, in order; `workers` matrices at a
    time (default: one per core, one on a GPU), each on one torch thread
    (`per_matrix_threads.py`), so every matrix gets the iterates its exact error-table
    row priced. `progress(i, n, name, seconds)` sees them as they finish.

    `weight_of(target)` supplies each dense weight (default: read from `model`), so a
    caller can read it from disk when its turn comes; with `on_result(target, d)` each
    result goes there as it finishes and is not kept (the returned dict is empty).
    `ranks` gives a matrix its own rank (default: `settings.rank`; 0: no low-rank part)."""
    unplanned = [t.name for t in targets if t.name not in plan]
    if unplanned:
        raise LQLoRAInputError(
            f"the plan assigns no config to {len(unplanned)} targets, e.g. {unplanned[0]!r}"
        )
    if method.fisher and fisher is None:
        raise LQLoRAInputError(f"method {method.name!r} needs Fisher diagonals; compute them first")
    if workers is None:
        workers = matrix_workers(next(model.parameters()).device)
    if weight_of is None:
        def weight_of(t: Target) -> torch.Tensor:
            return target_weight(model, t).detach()

    def decompose(t: Target) -> tuple[Decomposition, float]:
        start = time.perf_counter()
        W = weight_of(t)
        f = fisher[t.name] if (method.fisher and fisher is not None) else None
        rank = settings.rank if ranks is None else ranks.get(t.name, settings.rank)
        return method.decompose(W, plan[t.name], settings, f, rank), time.perf_counter() - start

    out = {}
    for i, (t, (d, seconds)) in enumerate(one_thread_per_matrix(decompose, targets, workers), 1):
        if on_result is None:
            out[t.name] = d
        else:
            on_result(t, d)
        if progress is not None:
            progress(i, len(targets), t.name, seconds)
    return {t.name: out[t.name] for t in targets if t.name in out}


def apply_decompositions(
    model: torch.nn.Module, decompositions: dict[str, Decomposition], scaling: float = 1.0
) -> torch.nn.Module:
    inits = {n: LayerInit(d.quantized(), d.L1, d.L2) for n, d in decompositions.items()}
    return replace_with_lq(model, inits, scaling)
