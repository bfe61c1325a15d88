"""A property of `lqlora data add`: any generated file (txt / jsonl / json / csv / parquet;
encodings, quoting, nesting, empty and huge cells, mixed kinds) is either stored with
exactly the rows it holds, or refused with rc 2 and a message, never a traceback and
never a partial store. A fixed seed and a bounded number of examples."""

import csv
import io
import json
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lqlora_dagster.data.datasets import load_rows
from lqlora_dagster.data.files import checksum, read_table
from lqlora_dagster.pipeline.dataset_registry import lookup_dataset
from lqlora_dagster.store.warehouse import Warehouse
from tests.data.cli_run import lqlora, stored

# ---------- property: any generated file is stored exactly, or refused with a message ----------

_TEXT = st.text(st.characters(codec="utf-8"), max_size=30)
_CLEAN = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cf", "Cs", "Zl", "Zp")), min_size=1,
                 max_size=30).filter(lambda s: s.strip())
_HUGE = st.integers(140_000, 400_000).map(lambda n: "huge cell, " * (n // 11))
_CELL = st.one_of(_TEXT, _CLEAN, st.none(), st.integers(-2**70, 2**70), st.floats(), st.booleans(),
                  st.lists(_TEXT, max_size=3), st.dictionaries(st.sampled_from(["a", "role", "content"]), _TEXT, max_size=2),
                  st.just("a lone \ud800 surrogate"), _HUGE)
_ROWS = st.lists(st.fixed_dictionaries(  # a text in most rows (any string, often a clean one) and any others
    {}, optional={"text": st.one_of(_CLEAN, _TEXT, _CELL), **{k: _CELL for k in ("label", "prompt", "response", "other")}}
), min_size=1, max_size=6).map(lambda rows: rows if any(rows) else [{"text": ""}])
_CLEAN_ROWS = st.lists(st.fixed_dictionaries({"text": _CLEAN}), min_size=1, max_size=6)
_ENCODING = st.sampled_from(["utf-8", "latin-1", "utf-16", "cp1252"])


def _csv_cell(value) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _valid(value):
    """The value with lone surrogates replaced (what a parquet writer can store)."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if isinstance(value, list):
        return [_valid(v) for v in value]
    if isinstance(value, dict):
        return {k: _valid(v) for k, v in value.items()}
    return value


def _parquet(path: Path, rows: list[dict]) -> list[dict]:
    rows = [_valid(r) for r in rows]
    try:
        table = pa.Table.from_pylist(rows)
        pq.write_table(table, path)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):  # kinds parquet cannot hold: text
        table = pa.Table.from_pylist([{k: _csv_cell(v) for k, v in r.items()} for r in rows])
        pq.write_table(table, path)
    return table.to_pylist()


def _text_of(fmt: str, rows: list[dict], style: dict) -> tuple[str, list[dict]]:
    """The file's text, and the rows it holds as `data add` must read them."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    if fmt == "txt":
        text = str(rows[0].get("text", ""))
        return text, [{"text": text}]
    if fmt == "csv":
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, quoting=csv.QUOTE_ALL if style["quote_all"] else csv.QUOTE_MINIMAL)
        cells = [[_csv_cell(r.get(c)) for c in columns] for r in rows]
        writer.writerows([columns, *cells])
        return buffer.getvalue(), [dict(zip(columns, c)) for c in cells]
    dump = lambda v: json.dumps(v, ensure_ascii=style["ascii"])  # noqa: E731
    text = ("\n".join(dump(r) for r in rows) if fmt == "jsonl" else dump(rows)) + "\n"
    return text, [{c: r.get(c) for c in columns} for r in rows]


def _write(folder: Path, fmt: str, rows: list[dict], style: dict) -> tuple[Path, list[dict], str]:
    """(the file, the rows it holds, the encoding its text was written in)."""
    path = folder / f"d.{fmt}"
    if fmt == "parquet":
        return path, _parquet(path, rows), "utf-8"
    text, expected = _text_of(fmt, rows, style)
    try:
        data, written = text.encode(style["encoding"]), style["encoding"]
    except UnicodeEncodeError:  # not in that encoding: UTF-8 (lone surrogates kept, as bad bytes)
        data, written = text.encode("utf-8", "surrogatepass"), "utf-8"
    path.write_bytes(data)
    return path, expected, written


def _decodes_to(data: bytes, encoding: str) -> str | None:
    try:
        return data.decode("utf-8-sig" if encoding == "utf-8" else encoding)
    except UnicodeDecodeError:
        return None


def _same(got, want) -> bool:
    if isinstance(want, float) and isinstance(got, float):
        return got == want or (got != got and want != want)
    if isinstance(want, dict) and isinstance(got, dict):
        return got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    if isinstance(want, list) and isinstance(got, (list, tuple)):
        return len(got) == len(want) and all(map(_same, got, want))
    if want is None:
        return got is None or (isinstance(got, float) and got != got)
    return type(got) is type(want) and got == want


@pytest.fixture(scope="module")
def property_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("property-home")
    Warehouse(home / "lqlora.duckdb").init_schema()
    return home


_counter = iter(range(10**6))


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "json", "csv", "parquet"])
@settings(derandomize=True, max_examples=15, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(clean=st.booleans(), rows=_ROWS,
       clean_rows=_CLEAN_ROWS, style=st.fixed_dictionaries(
           {"encoding": _ENCODING, "declare": st.booleans(), "quote_all": st.booleans(), "ascii": st.booleans()}))
def test_data_add_stores_the_file_rows_or_refuses_with_a_message(property_home, fmt, clean, rows, clean_rows, style):
    """Generated txt / jsonl / json / csv / parquet files (encodings, quoting, nesting,
    empty and huge cells, mixed kinds): either every row is stored as the file holds it
    and what a task reads is text, or rc 2 with a message and nothing stored."""
    home, name = property_home, f"d{next(_counter)}"
    with tempfile.TemporaryDirectory() as folder:
        path, expected, written = _write(Path(folder), fmt, clean_rows if clean else rows, style)
        encoding = style["encoding"] if style["declare"] and fmt != "parquet" else "utf-8"
        decoded = None if fmt == "parquet" else _decodes_to(path.read_bytes(), encoding)
        before = stored(home)
        rc, out, err = lqlora(home, "data", "add", name, path, "--encoding", encoding)
        assert rc in (0, 2) and "Traceback" not in out + err
        event(f"{fmt}: {'stored' if rc == 0 else 'refused'}")
        if rc == 2:
            assert err.startswith("error: ") and len(err) > 20 and stored(home) == before  # nothing partial
            assert not (clean and (fmt == "parquet" or decoded is not None)), (fmt, style, err)  # clean text is read
            return
        spec = lookup_dataset(Warehouse(home / "lqlora.duckdb"), name)  # stored, and read back from its row
        table = read_table(path, spec.reading)
        assert spec.rows == len(table.frame) and spec.sha256 == checksum(path, spec.reading)
        got = table.frame.to_dict("records")
        if fmt == "txt":
            assert got == [{"text": decoded}]
        elif fmt == "parquet" or encoding == written:  # read in the encoding it was written in
            assert len(got) == len(expected) and all(map(_same, got, expected)), (got, expected)
        for role in ("text", "prompt", "response"):  # what a task reads is text, whatever else the file holds
            column = getattr(spec.use, role)
            if column is not None:
                assert all(isinstance(v, str) and v.strip() for v in load_rows(spec)[column])
