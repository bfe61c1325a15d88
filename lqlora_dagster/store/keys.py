"""Stable content keys: the same inputs give the same key in any process.

Every pipeline result is stored under a key hashed from what produced it (upstream
keys, config, code version), so "already computed?" is a lookup, not a guess.
"""

import dataclasses
import hashlib
import json
from pathlib import Path


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 3.0 and 3 are the same budget
    return value


def stable_key(*parts, length: int = 16) -> str:
    text = json.dumps([_plain(p) for p in parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
