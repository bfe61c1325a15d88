"""The row formats: JSON Lines, JSON, CSV (parsed from decoded text) and Parquet (DuckDB).

JSON and CSV are parsed by Python's own parsers rather than a type-inferring reader:
a cell is exactly the value the file holds (a number stays a number, a string keeps
its quotes out, a CSV cell is the text between its commas), nothing is sampled, and
an error names the line an editor shows (counted from 1). Every reader returns the
rows (object columns, one per key or header name) and, per row, where it starts.
"""

import csv
import io
import json
from pathlib import Path

import duckdb
import pandas as pd

from lqlora_dagster.errors import LQLoRAInputError

_DELIMITERS = (",", ";", "\t", "|")


class _Refused(ValueError):
    """A JSON value the format does not allow (NaN, a key named twice)."""


def _no_constant(name: str):
    raise _Refused(f"{name} is not a JSON value (write null, or a number)")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _Refused(f"the key {key!r} appears twice in one object")
        seen[key] = value
    return seen


def _json_value(text: str):
    return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)


def _json_kind(value) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _frame(records: list[dict]) -> pd.DataFrame:
    """Rows from objects: one column per key (in first-seen order), missing keys empty."""
    columns = list(dict.fromkeys(k for r in records for k in r))
    return pd.DataFrame([[r.get(c) for c in columns] for r in records], columns=columns, dtype=object)


def parse_jsonl(file: Path, text: str) -> tuple[pd.DataFrame, list[str]]:
    """One JSON object per line; blank lines are skipped. Lines split at '\\n' only, so a
    string holding U+2028 or a form feed stays one line."""
    records, where = [], []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = _json_value(line)
        except json.JSONDecodeError as err:
            raise LQLoRAInputError(
                f"{file}: line {number} is not valid JSON ({err.msg} at column {err.colno}); each line of a "
                '.jsonl file is one object, e.g. {"text": "..."}'
            ) from err
        except (_Refused, RecursionError) as err:
            why = str(err) if isinstance(err, _Refused) else "it nests too deeply"
            raise LQLoRAInputError(f"{file}: line {number} cannot be a row: {why}") from err
        if not isinstance(value, dict):
            raise LQLoRAInputError(
                f'{file}: line {number} holds {_json_kind(value)}, not an object; each line is one row, e.g. {{"text": "..."}}'
            )
        records.append(value)
        where.append(f"line {number}")
    return _frame(records), where


def parse_json(file: Path, text: str) -> tuple[pd.DataFrame, list[str]]:
    """An array of objects (one row each), one object (one row), or JSON Lines in a .json file."""
    try:
        value = _json_value(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several values: JSON Lines under a .json name
            return parse_jsonl(file, text)
        raise LQLoRAInputError(
            f"{file} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
        ) from err
    except (_Refused, RecursionError) as err:
        why = str(err) if isinstance(err, _Refused) else "it nests too deeply"
        raise LQLoRAInputError(f"{file} cannot be read as rows: {why}") from err
    if isinstance(value, dict):
        return _frame([value]), [""]
    if not isinstance(value, list):
        raise LQLoRAInputError(f"{file} holds {_json_kind(value)}; a .json dataset is an array of objects, one per row")
    odd = next((i for i, v in enumerate(value) if not isinstance(v, dict)), None)
    if odd is not None:
        raise LQLoRAInputError(
            f"{file}: item {odd} of the array is {_json_kind(value[odd])}, not an object; each item is one row, "
            'e.g. {"text": "..."}'
        )
    return _frame(value), [f"item {i}" for i in range(len(value))]


def _delimiter(text: str) -> str:
    """The header line's most frequent separator among , ; tab | (a comma when none)."""
    header = text.split("\n", 1)[0]
    counts = {d: header.count(d) for d in _DELIMITERS}
    best = max(_DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


def _header(row: list[str], file: Path) -> list[str]:
    names = [name.strip() or f"column{i}" for i, name in enumerate(row)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise LQLoRAInputError(f"{file}: the header names column(s) {', '.join(map(repr, twice))} more than once")
    return names


def parse_csv(file: Path, text: str) -> tuple[pd.DataFrame, list[str]]:
    """A header row, then one row per record; every cell is text, quoted cells may hold the
    separator, quotes ("") and line breaks. Blank lines are skipped."""
    csv.field_size_limit(2**31 - 1)  # a huge cell is still a cell (the default stops at 128 KiB)
    delimiter = _delimiter(text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header, rows, where = None, [], []
    try:
        while True:
            start = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                break
            if not row:
                continue
            if header is None:
                header = _header(row, file)
                continue
            if len(row) != len(header):
                raise LQLoRAInputError(
                    f"{file}: the row at line {start} has {len(row)} field(s), the header has {len(header)}; "
                    f"quote cells that hold the separator {delimiter!r}"
                )
            rows.append(row)
            where.append(f"line {start}")
    except csv.Error as err:
        raise LQLoRAInputError(f"{file} is not valid CSV at line {reader.line_num}: {err}") from err
    if header is None:
        raise LQLoRAInputError(f"{file} holds no data (not even a header row)")
    return pd.DataFrame(rows, columns=header, dtype=object), where


def read_parquet(file: Path, data: bytes) -> tuple[pd.DataFrame, dict[str, str]]:
    """(rows as Python values, {column: DuckDB type}) of a parquet file."""
    if not data:
        raise LQLoRAInputError(f"{file} is empty")
    try:
        with duckdb.connect() as con:
            cursor = con.execute("SELECT * FROM read_parquet(?)", [str(file)])
            names = [d[0] for d in cursor.description]
            types = {d[0]: str(d[1]) for d in cursor.description}
            rows = cursor.fetchall()
    except (duckdb.Error, ValueError, TypeError, OverflowError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise LQLoRAInputError(f"cannot read {file} as parquet: {first}") from err
    return pd.DataFrame(rows, columns=names, dtype=object), types


PARSERS = {"jsonl": parse_jsonl, "json": parse_json, "csv": parse_csv}
