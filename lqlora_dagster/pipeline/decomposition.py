"""Stage `decomposed_model`: decompose every target by its plan; save the LQ model."""

import time

import pandas as pd
import torch

from lqlora_dagster.decompose.lq import LQSettings
from lqlora_dagster.methods import get_method
from lqlora_dagster.metrics import storage
from lqlora_dagster.models.kinds import model_kind
from lqlora_dagster.models.loading import load_tokenizer
from lqlora_dagster.models.skeleton import base_without_targets
from lqlora_dagster.models.targets import Target, find_targets
from lqlora_dagster.models.weights import read_target_weights
from lqlora_dagster.pipeline.base_model_stage import load_with_targets, recorded_targets
from lqlora_dagster.pipeline.calibration import load_fisher
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.handles import (
    DecomposedHandle,
    DecompositionRef,
    FisherHandle,
    ModelHandle,
    PlanHandle,
)
from lqlora_dagster.pipeline.planning import plan_choices
from lqlora_dagster.store.keys import stable_key
from lqlora_dagster.surgery.decompose_model import apply_decompositions, decompose_targets
from lqlora_dagster.surgery.injector import lq_layers
from lqlora_dagster.surgery.lq_model_io import load_lq_model, save_lq_model

DECOMPOSITION_VERSION = "4"  # 4: warm-started fits take no power iteration of their own
ASSET = "decomposed_model"


def decomposition_key(model: ModelHandle, plan_id: str, lq: LQSettings, fisher_key: str | None) -> str:
    return stable_key(model.key, plan_id, lq, fisher_key, DECOMPOSITION_VERSION)


def run_decomposition(
    ctx: StageContext, model: ModelHandle, plans: PlanHandle, fisher: FisherHandle | None
) -> DecomposedHandle:
    items = []
    fisher_tensors = None
    for plan in plans.plans:
        method = get_method(plan.method)
        fisher_key = fisher.key if (method.fisher and fisher is not None) else None
        key = decomposition_key(model, plan.plan_id, plans.lq, fisher_key)
        art = ctx.store.find(ASSET, model.model, key)
        if art is None:
            if method.fisher and fisher_tensors is None and fisher is not None:
                fisher_tensors = load_fisher(ctx, fisher)
            art = _decompose(ctx, model, plan, method, plans.lq, fisher_tensors, key)
        else:
            ctx.log(f"decomposition {plan.method} @ {plan.budget:g}: cached")
        lq = load_lq_model(art.path)
        st = storage(lq)
        items.append(
            DecompositionRef(
                plan.plan_id, plan.method, plan.budget, key, st.bits_per_param, st.bits_incl_lowrank,
                max((layer.rank for layer in lq_layers(lq).values()), default=0),
            )
        )
    return DecomposedHandle(model.model, items)


def _base_and_reader(ctx: StageContext, model: ModelHandle):
    """The base model without its target weights and a reader of one target weight from
    disk, so at most the matrices being decomposed are dense at any time; the whole model
    when the checkpoint does not cover it."""
    targets = recorded_targets(ctx, model.model)
    base = base_without_targets(model.folder, model_kind(model.task), targets)
    if base is None:
        ctx.log(f"{model.model}: the checkpoint does not hold every tensor under its module name (older names, "
                "or a classifier head it lacks); loading the whole model")
        base, targets = load_with_targets(model, ctx.device)
        return base, targets, None

    def read(t: Target) -> torch.Tensor:
        return read_target_weights(model.folder, [t])[t.name].to(ctx.device)

    base._apply(lambda t: t if t.is_meta else t.to(ctx.device))  # the targets' weights stay unallocated
    return base, find_targets(base, model.pattern), read


def _decompose(ctx, model, plan, method, settings, fisher_tensors, key):
    base, targets, read = _base_and_reader(ctx, model)
    choices = plan_choices(ctx, plan.plan_id, settings.rank)
    configs = {name: config for name, (config, _) in choices.items()}
    ranks = {name: rank for name, (_, rank) in choices.items()}
    start = time.perf_counter()
    every = max(1, len(targets) // 10)
    seconds: dict[str, float] = {}
    results: dict[str, tuple[float, int]] = {}

    def progress(i: int, n: int, name: str, spent: float) -> None:
        seconds[name] = spent
        if i % every == 0 or i == n:
            ctx.progress(f"decompose {plan.method} @ {plan.budget:g}", i, n, "matrices", f"{time.perf_counter() - start:.0f}s")

    def install(t: Target, d) -> None:  # packed into the model now; the unpacked codes are dropped
        apply_decompositions(base, {t.name: d})
        results[t.name] = (d.error, len(d.trace))

    decompose_targets(base, targets, configs, method, settings, fisher_tensors, progress, ctx.matrix_workers,
                      weight_of=read, on_result=install, ranks=ranks)
    tokenizer = load_tokenizer(model.folder)
    art = ctx.store.save_folder(
        ASSET, model.model, key, lambda d: save_lq_model(base.cpu(), d, tokenizer, model.task)
    )
    rows = pd.DataFrame(
        [
            {
                "decomp_key": key,
                "plan_id": plan.plan_id,
                "model": model.model,
                "matrix": t.name,
                "config": configs[t.name].name,
                "rank": ranks[t.name],
                "error": results[t.name][0],
                "iters": results[t.name][1],
                "seconds": seconds[t.name],
            }
            for t in targets
        ]
    )
    ctx.warehouse.replace_rows("decompositions", rows, {"decomp_key": key})
    return art
