"""Read target weight matrices straight from a folder's safetensors files, without
building the model: the error table needs only the matrices, and parallel workers
should not each pay a full model load."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from lqlora_dagster.models.checkpoint_files import SAFETENSORS_BYTES
from lqlora_dagster.models.loading import load_model
from lqlora_dagster.models.source import task_of_folder
from lqlora_dagster.models.targets import Target, target_weight


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


def nontarget_bytes(folder: Path, targets: list[Target]) -> int:
    """Bytes of every stored tensor that is not a target's weight (embeddings, norms,
    heads, the targets' biases) at the precision the checkpoint stores it; read from
    the safetensors headers, nothing is loaded. A tensor stored once counts once (tied
    embeddings). A checkpoint whose names do not match module names is counted from
    the model, at its parameters' precision."""
    folder = Path(folder)
    files = key_to_file(folder)
    weights = {f"{t.name}.weight" for t in targets}
    if not weights <= set(files):
        model = load_model(folder, task_of_folder(folder))
        seen = {p.data_ptr() for n, p in model.named_parameters() if n in weights}
        tensors = {p.data_ptr(): p for p in model.state_dict().values() if p.data_ptr() not in seen}
        return sum(p.numel() * p.element_size() for p in tensors.values())
    total = 0
    for path in sorted(set(files.values())):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if key not in weights:
                    piece = f.get_slice(key)
                    numel = 1
                    for n in piece.get_shape():
                        numel *= n
                    total += numel * SAFETENSORS_BYTES[piece.get_dtype()]
    return total
