"""Read a user's data file into a table of rows, whatever its format.

`.txt` (one row: the whole file), a folder of `.txt` files (one row per file, in name
order), `.jsonl` / `.json` / `.csv` (parsed here, so every cell is exactly what the file
says and an error names its line) and `.parquet` (read by DuckDB, typed by the file).
Text is decoded once, strictly, in the encoding the user names (UTF-8 by default, a
UTF-8 byte-order mark dropped): a binary file, or text in another encoding, fails here
with the offending byte before a tokenizer garbles it. The checksum covers exactly
the bytes that were read (and the encoding, when it is not UTF-8).
"""

import codecs
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lqlora_dagster.data.parsers import PARSERS, read_parquet
from lqlora_dagster.errors import LQLoRAInputError

FORMATS = {".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
UTF8 = "utf-8"
_CONTROL = set(range(32)) - {8, 9, 10, 11, 12, 13, 27}  # bytes no text file holds in numbers
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
         (codecs.BOM_UTF16_BE, "UTF-16"))
_SHOWN = 10  # files named in a message about a folder


@dataclass(frozen=True)
class Reading:
    """How the bytes become text: the encoding, and whether a folder's files that cannot
    be read as text (binary, another encoding, empty) are left out instead of refusing it."""

    encoding: str = UTF8
    skip_unreadable: bool = False

    def checked(self) -> "Reading":
        """The same reading with the encoding's canonical name; an unknown one is an error."""
        try:
            name = codecs.lookup(self.encoding).name
            b"a".decode(name)  # a bytes-to-bytes codec (hex, base64, zlib) is not a text encoding
        except UnicodeDecodeError:  # a text encoding that needs more than one byte
            pass
        except (LookupError, TypeError) as err:
            raise LQLoRAInputError(
                f"--encoding {self.encoding!r} is not a text encoding Python knows; use e.g. utf-8, latin-1, "
                "cp1252 or utf-16"
            ) from err
        return Reading(name, self.skip_unreadable)


@dataclass
class Table:
    """What a data file holds: its rows, where each row is in the file, the checksum of
    the bytes read, the declared column types (parquet) and the files left out."""

    format: str
    frame: pd.DataFrame
    sha256: str
    where: list[str] = field(default_factory=list)  # per row: "line 4", "file a/b.txt" ("" when the row is all)
    types: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "name: why", a folder's files left out


class Unreadable(LQLoRAInputError):
    """A file that is not text in the expected encoding; `why` is the short reason."""

    def __init__(self, file: Path, why: str, advice: str):
        super().__init__(f"{file} {why}; {advice}")
        self.why = why


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
    try:
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    except OSError as err:
        raise LQLoRAInputError(f"cannot list the folder {path}: {err.strerror or err}") from err
    if not files:
        raise LQLoRAInputError(f"folder {path} holds no .txt files; a folder dataset is one document per .txt file")
    return files


def _binary_at(sample: bytes | str) -> str | None:
    """Why the bytes (or decoded text) are not text, or None: a NUL, or many control codes."""
    raw = isinstance(sample, bytes)
    nul = sample.find(b"\0" if raw else "\0")
    if nul >= 0:
        return f"a NUL {'byte' if raw else 'character'} at offset {nul}"
    head = sample[:8192]
    controls = sum((c if raw else ord(c)) in _CONTROL for c in head)
    return f"{controls} control codes in its first {len(head):,}" if controls > 0.05 * len(head) else None


def _utf16_without_mark(data: bytes) -> str | None:
    """'utf-16-le' / 'utf-16-be' when the bytes read as that, NULs in every other byte."""
    head = data[:8192]
    if len(head) < 4 or len(head) % 2:
        return None
    for codec, zeros in (("utf-16-le", head[1::2]), ("utf-16-be", head[0::2])):
        if zeros.count(0) > 0.9 * len(zeros):
            try:
                data.decode(codec)
                return codec
            except UnicodeDecodeError:
                return None
    return None


def _refuse_binary(file: Path, data: bytes, encoding: str, text: str | None = None) -> None:
    """Raise when the bytes are UTF-16 without a mark, or binary; else return."""
    utf16 = _utf16_without_mark(data) if encoding == UTF8 else None
    if utf16:
        raise Unreadable(file, f"looks like {utf16.upper()} text without a byte-order mark (every other byte is 0)",
                         f"pass --encoding {utf16}")
    binary = _binary_at(data if text is None else text)
    if binary:
        raise Unreadable(file, f"is binary, not text ({binary})", "a dataset is text: give the text file it was made from")


def decode(file: Path, data: bytes, encoding: str = UTF8) -> str:
    """The file's text; binary data, or bytes the encoding cannot decode, are an error."""
    if encoding == UTF8:
        for bom, name in _BOMS:
            if data.startswith(bom):
                raise Unreadable(file, f"is {name} text (it starts with a {name} byte-order mark)",
                                 f"pass --encoding {name.lower()}, or convert it: `iconv -f {name} -t UTF-8 IN > OUT`")
    try:
        text = data.decode("utf-8-sig" if encoding == UTF8 else encoding)
    except UnicodeDecodeError as err:
        _refuse_binary(file, data, encoding)
        byte = f"byte {err.object[err.start]:#04x} at offset {err.start}"
        if encoding == UTF8:
            raise Unreadable(file, f"is not UTF-8 text ({byte})",
                             "if it is Latin-1, pass --encoding latin-1 or convert it: "
                             "`iconv -f latin1 -t utf-8 IN > OUT`") from err
        raise Unreadable(file, f"is not {encoding} text ({byte})", "pass the file's encoding with --encoding") from err
    if _binary_at(text):
        _refuse_binary(file, data, encoding, text)
    return text


def _digest(reading: Reading):
    """A sha256 that, for a non-UTF-8 reading, starts with the encoding (the same bytes read
    as another encoding are other text); UTF-8 keeps the checksum of the bytes alone."""
    digest = hashlib.sha256()
    if reading.encoding != UTF8:
        digest.update(f"encoding={reading.encoding}\0".encode())
    return digest


def _read_folder(path: Path, reading: Reading) -> Table:
    """One row per readable .txt file; unreadable or empty ones refuse the folder, or are
    left out (and listed) under `skip_unreadable`."""
    files = data_files(path)
    digest, texts, where, bad = _digest(reading), [], [], []
    for file in files:
        name = str(file.relative_to(path))
        try:
            data = file.read_bytes()
            text = decode(file, data, reading.encoding)
        except Unreadable as err:
            bad.append(f"{name}: {err.why}")
            continue
        except OSError as err:
            bad.append(f"{name}: cannot be read ({err.strerror or err})")
            continue
        if not text.strip():
            bad.append(f"{name}: holds no text")
            continue
        digest.update(name.encode() + b"\0" + data)
        texts.append(text)
        where.append(f"file {name}")
    if bad and not reading.skip_unreadable:
        raise LQLoRAInputError(
            f"{len(bad):,} of the {len(files):,} .txt files in {path} cannot be used ({_listed(bad)}); convert or "
            "remove them, pass --encoding ENCODING if the folder is not UTF-8 text (e.g. --encoding latin-1), or "
            "--skip-unreadable to leave such files out and list them"
        )
    if not texts:
        raise LQLoRAInputError(f"{path} holds no data: none of its {len(files):,} .txt files is readable text "
                               f"({_listed(bad)})")
    return Table("txt-folder", pd.DataFrame({"text": texts}, dtype=object), digest.hexdigest(), where, skipped=bad)


def _bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as err:
        raise LQLoRAInputError(f"cannot read {file}: {err.strerror or err}") from err


def _listed(items: list[str]) -> str:
    more = f"; and {len(items) - _SHOWN:,} more" if len(items) > _SHOWN else ""
    return "; ".join(items[:_SHOWN]) + more


def _read_file(path: Path, fmt: str, reading: Reading) -> Table:
    data = _bytes(path)  # once: a pipe or a file being rewritten is read and hashed as one
    digest = _digest(reading)
    digest.update(data)
    if fmt == "parquet":
        if reading.encoding != UTF8:
            raise LQLoRAInputError(f"--encoding does not apply to {path.name}: parquet text is always UTF-8")
        frame, types = read_parquet(path, data)
        return Table(fmt, frame, digest.hexdigest(), [""] * len(frame), types)
    if not data:
        raise LQLoRAInputError(f"{path} is empty")
    text = decode(path, data, reading.encoding)
    if fmt == "txt":
        if not text.strip():
            raise LQLoRAInputError(f"{path} holds no data (only empty text)")
        return Table(fmt, pd.DataFrame({"text": [text]}, dtype=object), digest.hexdigest(), [""])
    frame, where = PARSERS[fmt](path, text)
    return Table(fmt, frame, digest.hexdigest(), where)


def read_table(path: Path, reading: Reading = Reading()) -> Table:
    """Every row of a data file or folder, read as `reading` says; no rows is an error."""
    path = Path(path).expanduser()
    reading = reading.checked()
    data_files(path)
    fmt = format_of(path)
    if reading.skip_unreadable and fmt != "txt-folder":
        raise LQLoRAInputError(f"--skip-unreadable leaves out files of a folder; {path.name} is one {fmt} file")
    table = _read_folder(path, reading) if fmt == "txt-folder" else _read_file(path, fmt, reading)
    if table.frame.empty:
        raise LQLoRAInputError(f"{path} holds no data (no rows)")
    return table


def read_rows(path: Path, reading: Reading = Reading()) -> tuple[str, pd.DataFrame]:
    """(format, rows) of a data file or folder."""
    table = read_table(path, reading)
    return table.format, table.frame


def checksum(path: Path, reading: Reading = Reading()) -> str:
    """sha256 over the bytes (and, for a folder, the relative names) of every file read."""
    path = Path(path).expanduser()
    reading = reading.checked()
    if reading.skip_unreadable and path.is_dir():  # which files are read depends on their text
        return _read_folder(path, reading).sha256
    digest = _digest(reading)
    for file in data_files(path):
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        digest.update(_bytes(file))
    return digest.hexdigest()
