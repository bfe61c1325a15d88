"""What every stage needs: where results are stored, the device, and a logger."""

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.per_matrix_threads import matrix_workers
from lqlora_dagster.store.artifacts import ArtifactStore
from lqlora_dagster.store.ledger import ArtifactLedger
from lqlora_dagster.store.warehouse import Warehouse

_log = logging.getLogger("lqlora")


def default_home() -> Path:
    """LQLORA_HOME, default ./.lqlora: DuckDB file, artifacts, model cache, checkpoints."""
    return Path(os.environ.get("LQLORA_HOME", ".lqlora")).resolve()


def ensure_writable_home(home: Path) -> Path:
    """Create LQLORA_HOME if needed and prove it takes files, before any work starts."""
    home = Path(home)
    probe = home / f".write-probe-{os.getpid()}"
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise LQLoRAInputError(
            f"LQLORA_HOME {home} is not a writable folder ({err.strerror}); "
            "point --home or LQLORA_HOME at a folder you can write"
        ) from err
    return home


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class StageContext:
    store: ArtifactStore
    warehouse: Warehouse
    model_cache: Path
    checkpoints: Path
    device: torch.device = field(default_factory=lambda: resolve_device("auto"))
    log: Callable[[str], None] = _log.info
    cpu_workers: int = 0  # matrices decomposed at a time on CPU (0: one per core)

    def progress(self, what: str, done: int, total: int, unit: str, note: str = "") -> None:
        """A progress line in one format ("what: done/total unit (note)"), which the CLI
        turns into a progress bar."""
        self.log(f"{what}: {done}/{total} {unit}" + (f" ({note})" if note else ""))

    @property
    def matrix_workers(self) -> int:
        return matrix_workers(self.device, self.cpu_workers)

    def __post_init__(self) -> None:
        if self.store.on_damaged is None:
            self.store.on_damaged = self.log  # a damaged artifact being rebuilt shows in the run's log

    @classmethod
    def at(cls, home: Path, **kwargs) -> "StageContext":
        """Everything under one home folder (the default layout)."""
        home = Path(home)
        warehouse = Warehouse(home / "lqlora.duckdb")
        ctx = cls(
            ArtifactStore(home / "artifacts", ArtifactLedger(warehouse)),
            warehouse,
            home / "models",
            home / "checkpoints",
            **kwargs,
        )
        ctx.warehouse.init_schema()
        return ctx
