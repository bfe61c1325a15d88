"""Content-addressed artifact store under LQLORA_HOME/artifacts.

    artifacts/<asset>/<partition>/<key>.safetensors   (or <key>/ for a folder)
    artifacts/<asset>/<partition>/<key>.json          sidecar: sha256 per file, sizes

Writes go to a temporary name and are renamed into place, so a crash never leaves a
half-written artifact under its final name. With a ledger, the checksums are also
recorded in DuckDB (`artifacts`) and reads check the files against that record (the
sidecar alone is the fallback). A damaged artifact is reported (and treated as
absent by `find`, so the stage that owns it rebuilds it).
"""

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.store.keys import file_sha256
from lqlora_dagster.store.ledger import ArtifactLedger


class DamagedArtifact(LQLoRAInputError):
    """An artifact's bytes no longer match the checksum recorded when it was written."""


@dataclass(frozen=True)
class Artifact:
    asset: str
    partition: str
    key: str
    path: Path  # file or folder
    sha256: dict[str, str]  # relative file name -> checksum
    nbytes: int


class ArtifactStore:
    def __init__(self, root: Path, ledger: ArtifactLedger | None = None, on_damaged=None):
        self.root = Path(root)
        self.ledger = ledger
        self.on_damaged = on_damaged  # called with the message when `find` skips a damaged artifact

    def _ledger_path(self, path: Path) -> str:
        """Artifact paths in the ledger are relative to the store root (a moved home still matches)."""
        return str(Path(path).relative_to(self.root))

    def _base(self, asset: str, partition: str, key: str) -> Path:
        return self.root / asset / partition / key

    def _sidecar(self, asset: str, partition: str, key: str) -> Path:
        return self._base(asset, partition, key).with_suffix(".json")

    # --- writing ---

    def save_tensors(
        self,
        asset: str,
        partition: str,
        key: str,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, str] | None = None,
    ) -> Artifact:
        def write(tmp: Path) -> None:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)

        return self._commit(asset, partition, key, ".safetensors", write)

    def save_folder(self, asset: str, partition: str, key: str, write_into) -> Artifact:
        """`write_into(folder)` fills a fresh folder; it is committed as one artifact."""

        def write(tmp: Path) -> None:
            tmp.mkdir()
            write_into(tmp)

        return self._commit(asset, partition, key, "", write)

    def _commit(self, asset: str, partition: str, key: str, suffix: str, write) -> Artifact:
        final = (
            self._base(asset, partition, key).with_suffix(suffix)
            if suffix
            else self._base(asset, partition, key)
        )
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent)) / ("x" + suffix)
        try:
            write(tmp)
            files = sorted(tmp.rglob("*")) if tmp.is_dir() else [tmp]
            sums = {
                str(f.relative_to(tmp)) if tmp.is_dir() else final.name: file_sha256(f)
                for f in files
                if f.is_file()
            }
            nbytes = sum(f.stat().st_size for f in files if f.is_file())
            if final.exists():
                shutil.rmtree(final) if final.is_dir() else final.unlink()
            os.replace(tmp, final)
            record = {"path": final.name, "sha256": sums, "nbytes": nbytes, "created": time.time()}
            side = self._sidecar(asset, partition, key)
            side_tmp = side.with_name(f".{side.name}.tmp")
            side_tmp.write_text(json.dumps(record, indent=1))
            if self.ledger is not None:
                self.ledger.record(self._ledger_path(final), asset, partition, key, sums, nbytes)
            os.replace(side_tmp, side)  # the sidecar is written last: it marks completion
        finally:
            shutil.rmtree(tmp.parent, ignore_errors=True)
        return Artifact(asset, partition, key, final, sums, nbytes)

    # --- reading ---

    def find(self, asset: str, partition: str, key: str, verify: bool = True) -> Artifact | None:
        """The complete, intact artifact for this key, or None (absent or damaged)."""
        try:
            return self.get(asset, partition, key, verify=verify)
        except FileNotFoundError:
            return None
        except DamagedArtifact as err:
            if self.on_damaged is not None:
                self.on_damaged(f"{err.args[0].split('; re-materialize')[0]}: rebuilding it")
            return None

    def get(self, asset: str, partition: str, key: str, verify: bool = True) -> Artifact:
        side = self._sidecar(asset, partition, key)
        if not side.is_file():
            raise FileNotFoundError(f"no artifact {asset}/{partition}/{key}")
        try:
            record = json.loads(side.read_text())
            path, sums = side.parent / record["path"], record["sha256"]
        except (ValueError, KeyError, TypeError) as err:
            raise DamagedArtifact(
                f"the record {side} of artifact {asset}/{partition}/{key} is unreadable ({err}); "
                f"re-materialize asset {asset!r} for partition {partition!r} to rebuild it"
            ) from err
        if self.ledger is not None:
            recorded = self.ledger.checksums(self._ledger_path(path))
            if recorded is not None and recorded != sums:
                raise DamagedArtifact(
                    f"artifact {path}: its sidecar disagrees with the checksums recorded in DuckDB; "
                    f"re-materialize asset {asset!r} for partition {partition!r} to rebuild it"
                )
        art = Artifact(asset, partition, key, path, sums, record["nbytes"])
        if verify:
            self.verify(art)
        return art

    def verify(self, art: Artifact) -> None:
        for name, expected in art.sha256.items():
            f = art.path / name if art.path.is_dir() else art.path
            if not f.is_file() or not _matches(f, expected):
                raise DamagedArtifact(
                    f"artifact {f} is missing or altered (checksum mismatch); re-materialize asset "
                    f"{art.asset!r} for partition {art.partition!r} to rebuild it"
                )

    def load_tensors(
        self, art: Artifact, keys: list[str] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """All tensors (or just `keys`, read lazily) and the header metadata."""
        try:
            return self._read_tensors(art, keys)
        except (OSError, RuntimeError, ValueError) as err:  # safetensors' header/parse errors
            if isinstance(err, DamagedArtifact):
                raise
            raise DamagedArtifact(
                f"artifact {art.path} cannot be read ({err}); re-materialize {art.asset!r} "
                f"for partition {art.partition!r}"
            ) from err

    @staticmethod
    def _read_tensors(art: Artifact, keys: list[str] | None):
        with safe_open(str(art.path), "pt") as f:
            meta = f.metadata() or {}
            if keys is None:
                return load_file(str(art.path)), meta
            missing = [k for k in keys if k not in set(f.keys())]
            if missing:
                raise DamagedArtifact(
                    f"artifact {art.path} lacks tensors {missing[:3]}; re-materialize {art.asset!r}"
                )
            return {k: f.get_tensor(k) for k in keys}, meta


_verified: set[tuple] = set()  # (path, size, mtime, checksum) this process has hashed and found equal


def _matches(f: Path, expected: str) -> bool:
    """Whether file f's sha256 is `expected`; a file unchanged (same size and mtime) since
    this process last checked it is not read again (plan confirmation reads the Fisher
    diagonals in every round, and hashing them cost a quarter of a second each time)."""
    stat = f.stat()
    key = (str(f), stat.st_size, stat.st_mtime_ns, expected)
    if key in _verified:
        return True
    if file_sha256(f) != expected:
        return False
    _verified.add(key)
    return True
