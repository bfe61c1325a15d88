"""Read target weight matrices straight from a folder's safetensors files, without
building the model: the error table needs only the matrices, and parallel workers
should not each pay a full model load."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from lqlora_dagster.models.targets import Target


def key_to_file(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    mapping = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            mapping.update({k: path for k in f.keys()})
    return mapping


def read_target_weights(folder: Path, targets: list[Target]) -> dict[str, torch.Tensor]:
    """{target name: (out, in) float32 weight}. Falls back to loading the model when the
    checkpoint's key names do not match module names (some older checkpoints)."""
    folder = Path(folder)
    files = key_to_file(folder)
    if not all(f"{t.name}.weight" in files for t in targets):
        from lqlora_dagster.models.loading import load_model
        from lqlora_dagster.models.source import task_of_folder
        from lqlora_dagster.models.targets import target_weight

        model = load_model(folder, task_of_folder(folder))
        return {t.name: target_weight(model, t).detach().to(torch.float32).contiguous() for t in targets}
    out = {}
    handles: dict[Path, object] = {}
    try:
        for t in targets:
            path = files[f"{t.name}.weight"]
            if path not in handles:
                handles[path] = safe_open(str(path), "pt").__enter__()
            w = handles[path].get_tensor(f"{t.name}.weight").to(torch.float32)
            out[t.name] = (w.T if t.transposed else w).contiguous()
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return out
