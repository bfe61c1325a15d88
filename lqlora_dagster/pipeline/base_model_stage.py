"""Stage `base_model`: resolve a registered model, list its target matrices."""

from pathlib import Path

import pandas as pd
import torch

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.models.kinds import model_kind
from lqlora_dagster.models.loading import load_model
from lqlora_dagster.models.skeleton import empty_model
from lqlora_dagster.models.source import resolve_model_folder
from lqlora_dagster.models.targets import Target, find_targets, target_weight
from lqlora_dagster.models.weights import key_to_file, read_target_weights
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.handles import ModelHandle
from lqlora_dagster.pipeline.registry import lookup_model
from lqlora_dagster.store.keys import file_sha256, stable_key
from lqlora_dagster.store.schemas import MATRICES
from lqlora_dagster.validation import check_matrix

CODE_VERSION = "1"


def weights_key(folder) -> str:
    """Checksum of all weight files (the model's identity, whatever its name)."""
    return stable_key(sorted((p.name, file_sha256(p)) for p in folder.glob("*.safetensors")))


def load_base(handle: ModelHandle, device: torch.device | str = "cpu") -> torch.nn.Module:
    return load_model(handle.folder, handle.task).to(device)


def load_with_targets(
    handle: ModelHandle, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, list[Target]]:
    """The base model and its targets, found again from the model itself (authoritative,
    and it knows each layer's storage layout)."""
    model = load_base(handle, device)
    return model, find_targets(model, handle.pattern)


def recorded_targets(ctx: StageContext, model_name: str) -> list[Target]:
    """The targets as `base_model` recorded them, without loading the model."""
    rows = ctx.warehouse.query(
        "SELECT name, rows, cols, layer, kind, transposed FROM matrices WHERE model = ? ORDER BY position",
        [model_name],
    )
    return [
        Target(r.name, int(r.rows), int(r.cols), int(r.layer), r.kind, bool(r.transposed))
        for r in rows.itertuples()
    ]


def checked_targets(folder: Path, task: str, pattern: str | None, model_name: str) -> list[Target]:
    """The targets, found on the model's module tree built without weights, each target
    weight then read from disk and checked for NaN and Inf on its own (one would otherwise
    surface hours later as a NaN error table): the stage holds one matrix, not the model.
    A checkpoint whose names do not cover the targets (older names) is loaded whole."""
    # transformers loads on first use (0.6 s): commands that read no model skip it
    from transformers import AutoConfig

    try:
        skeleton = empty_model(model_kind(task), AutoConfig.from_pretrained(folder))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LQLoRAInputError(f"cannot load a {task} model from {folder}: {err}") from err
    targets = find_targets(skeleton, pattern)
    files = key_to_file(Path(folder))
    if all(f"{t.name}.weight" in files for t in targets):
        for t in targets:
            check_matrix(read_target_weights(folder, [t])[t.name], f"model {model_name!r}: weight of {t.name}")
        return targets
    model = load_model(folder, task)
    targets = find_targets(model, pattern)
    for t in targets:
        check_matrix(target_weight(model, t).detach(), f"model {model_name!r}: weight of {t.name}")
    return targets


def run_base_model(ctx: StageContext, model_name: str) -> ModelHandle:
    record = lookup_model(ctx.warehouse, model_name)
    folder, task = resolve_model_folder(record["source"], ctx.model_cache)
    ctx.log(f"{model_name}: reading {folder}")
    targets = checked_targets(folder, task, record["pattern"], model_name)
    frame = pd.DataFrame(
        [
            {
                "model": model_name,
                "name": t.name,
                "kind": t.kind,
                "layer": t.layer,
                "rows": t.rows,
                "cols": t.cols,
                "numel": t.numel,
                "transposed": t.transposed,
                "position": i,
            }
            for i, t in enumerate(targets)
        ]
    )
    ctx.warehouse.replace_rows("matrices", MATRICES.validate(frame), {"model": model_name})
    return ModelHandle(
        model=model_name,
        folder=str(folder),
        task=task,
        pattern=record["pattern"],
        key=stable_key(weights_key(folder), record["pattern"], CODE_VERSION),
        n_targets=len(targets),
        target_params=sum(t.numel for t in targets),
    )
