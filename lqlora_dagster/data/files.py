"""Read a user's data file into a table of rows, whatever its format.

`.txt` (one row: the whole file), a folder of `.txt` files (one row per file, in name
order), and `.jsonl` / `.json` / `.csv` / `.parquet` read through DuckDB, which infers
the columns and their types. Text must be UTF-8: a file that is not fails here with the
offending byte, before DuckDB or a tokenizer garbles it.
"""

import hashlib
from pathlib import Path

import pandas as pd

from lqlora_dagster.errors import LQLoRAInputError

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_READERS = {
    "jsonl": "read_json_auto(?, format='newline_delimited')",
    "json": "read_json_auto(?)",
    "csv": "read_csv_auto(?, header=true)",
    "parquet": "read_parquet(?)",
}


def format_of(path: Path) -> str:
    """'txt-folder' for a folder, else the format named by the file's suffix."""
    if path.is_dir():
        return "txt-folder"
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise LQLoRAInputError(
            f"{path.name}: unknown data format {path.suffix or '(no suffix)'!r}; use a .txt file, a folder of "
            f".txt files, or one of {', '.join(sorted(set(FORMATS) - {'.txt'}))}"
        )
    return fmt


def data_files(path: Path) -> list[Path]:
    """The files a dataset reads: the file itself, or a folder's .txt files."""
    if not path.exists():
        raise LQLoRAInputError(f"data path {path} does not exist")
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise LQLoRAInputError(f"folder {path} holds no .txt files; a folder dataset is one document per .txt file")
    return files


def checksum(path: Path) -> str:
    """sha256 over the bytes (and, for a folder, the relative names) of every file."""
    digest = hashlib.sha256()
    for file in data_files(path):
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _utf8(file: Path) -> str:
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise LQLoRAInputError(
            f"{file} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8 IN > OUT`"
        ) from err


def read_rows(path: Path) -> tuple[str, pd.DataFrame]:
    """(format, rows) of a data file or folder; an empty table is an error."""
    path = Path(path).expanduser()
    files = data_files(path)
    fmt = format_of(path)
    if fmt in ("txt", "txt-folder"):
        frame = pd.DataFrame({"text": [_utf8(f) for f in files]})
    else:
        if fmt != "parquet":
            _utf8(files[0])
        frame = _read_with_duckdb(files[0], fmt)
    if frame.empty or (fmt in ("txt", "txt-folder") and not frame["text"].str.strip().any()):
        raise LQLoRAInputError(f"{path} holds no data (no rows, or only empty text)")
    return fmt, frame


def _read_with_duckdb(file: Path, fmt: str) -> pd.DataFrame:
    import duckdb

    if file.stat().st_size == 0:
        raise LQLoRAInputError(f"{file} is empty")
    try:
        with duckdb.connect() as con:
            return con.execute(f"SELECT * FROM {_READERS[fmt]}", [str(file)]).df()
    except duckdb.Error as err:
        first = str(err).strip().splitlines()[0]
        raise LQLoRAInputError(f"cannot read {file} as {fmt}: {first}") from err
