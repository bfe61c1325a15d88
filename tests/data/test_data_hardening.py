"""`lqlora data add / remove / list` through the real CLI: every bad file is rc 2 with a
message (never a traceback, never a partial store), every good one stores exactly the
rows the file holds, and concurrent registrations of one name give one winner. The
property test over generated files is in test_data_add_property.py."""

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lqlora_dagster.data.datasets import load_rows
from lqlora_dagster.data.files import checksum
from lqlora_dagster.data.selection import TaskData, part_stream
from lqlora_dagster.pipeline.dataset_registry import current, lookup_dataset, registered_datasets
from lqlora_dagster.store.warehouse import Warehouse
from tests.data.cli_run import lqlora, refused, stored

REPO = Path(__file__).resolve().parents[2]


# ---------- cells of the wrong kind ----------

def test_parquet_text_column_of_structs_is_refused_naming_the_column_and_its_type(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"text": [{"a": 1}, {"a": 2}]}), path)
    err = refused(tmp_path / "home", "data", "add", "s", path)
    assert "column 'text' must hold text" in err and "STRUCT(a BIGINT)" in err and "an object" in err
    assert stored(tmp_path / "home") == []


def test_parquet_label_column_of_lists_is_refused_naming_the_column_and_its_type(tmp_path):
    path = tmp_path / "l.parquet"
    pq.write_table(pa.table({"text": ["good", "bad"], "label": [[1], [0]]}), path)
    err = refused(tmp_path / "home", "data", "add", "l", path)
    assert "column 'label' must hold one string or number per row" in err and "BIGINT[]" in err and "a list" in err
    assert stored(tmp_path / "home") == []


OTHER_KINDS = {  # the same class in other formats and types (tracebacks or silent garbage before)
    "jsonl object as text": ("o.jsonl", '{"text": {"a": 1}}\n{"text": "b"}\n', "column 'text' must hold text; row 0"),
    "jsonl text mixing strings and numbers": ("m.jsonl", '{"text": "a"}\n{"text": 5}\n',
                                              "column 'text' must hold text; row 1 holds '5' (line 2, an integer)"),
    "jsonl list of numbers as label": ("n.jsonl", '{"text": "a", "label": [1]}\n{"text": "b", "label": [0]}\n',
                                       "column 'label' must hold one string or number per row"),
    "json response as an object": ("r.json", '[{"prompt": "p", "response": {"x": 1}}]',
                                   "column 'response' must hold text"),
    "jsonl chat content that is not text": ("c.jsonl", '{"messages": [{"role": "user", "content": "hi"}, '
                                            '{"role": "assistant", "content": 5}]}\n', "with text content"),
    "jsonl NaN label": ("f.jsonl", '{"text": "a", "label": NaN}\n', "line 1 cannot be a row: NaN is not a JSON value"),
}


@pytest.mark.parametrize("case", OTHER_KINDS, ids=list(OTHER_KINDS))
def test_cells_of_another_kind_are_refused_in_every_format(case, tmp_path):
    name, content, message = OTHER_KINDS[case]
    (tmp_path / name).write_text(content)
    assert message in refused(tmp_path / "home", "data", "add", "x", tmp_path / name)
    assert stored(tmp_path / "home") == []


def test_parquet_timestamp_labels_are_refused_naming_the_type(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": pd.to_datetime(["2020-01-01", "2021-01-01"])}), path)
    err = refused(tmp_path / "home", "data", "add", "t", path)
    assert "column 'label' must hold one string or number per row" in err and "TIMESTAMP" in err


def test_a_text_cell_holding_a_list_reads_as_its_first_string(tmp_path):
    path = tmp_path / "lists.jsonl"
    path.write_text('{"text": ["first answer", "second"]}\n{"text": ["third"]}\n{"text": "plain"}\n')
    home = tmp_path / "home"
    assert lqlora(home, "data", "add", "lists", path)[0] == 0
    spec = lookup_dataset(Warehouse(home / "lqlora.duckdb"), "lists")
    assert load_rows(spec)["text"].tolist() == ["first answer", "third", "plain"]
    ids = part_stream(TaskData("lm", spec, spec), "train", lambda text: torch.tensor([ord(c) for c in text]))
    assert "".join(map(chr, ids.tolist())).startswith("first answer\n\nthird")


# ---------- lines, empty rows, encodings ----------

def test_jsonl_parse_error_names_the_right_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n{"text": "d"}\n')
    err = refused(tmp_path / "home", "data", "add", "bad", path)
    assert "line 3 is not valid JSON" in err and "line 4" not in err


def test_json_parse_error_names_the_right_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": oops}\n]\n')
    assert "at line 3, column 12" in refused(tmp_path / "home", "data", "add", "bad", path)


def _empty_text_files(folder: Path) -> dict[str, Path]:
    """One file per format, each with an empty text in its second row."""
    folder.mkdir()
    (folder / "e.jsonl").write_text('{"text": "a"}\n{"text": ""}\n{"text": "c"}\n')
    (folder / "e.json").write_text('[{"text": "a"}, {"text": "   "}, {"text": "c"}]')
    (folder / "e.csv").write_text('text\na\n""\nc\n')
    pq.write_table(pa.table({"text": ["a", "", "c"]}), folder / "e.parquet")
    docs = folder / "docs"
    docs.mkdir()
    for name, text in (("0.txt", "a"), ("1.txt", ""), ("2.txt", "c")):
        (docs / name).write_text(text)
    return {"jsonl": folder / "e.jsonl", "json": folder / "e.json", "csv": folder / "e.csv",
            "parquet": folder / "e.parquet", "txt-folder": docs}


def test_empty_text_is_refused_alike_in_every_format(tmp_path):
    where = {"jsonl": "row 1 (line 2)", "json": "row 1 (item 1)", "csv": "row 1 (line 3)", "parquet": "row 1",
             "txt-folder": "1.txt: holds no text"}
    for fmt, path in _empty_text_files(tmp_path / "files").items():
        err = refused(tmp_path / "home", "data", "add", fmt, path)
        assert where[fmt] in err, (fmt, err)
        if fmt != "txt-folder":
            assert "column 'text' is empty in 1 of 3 row(s)" in err and "trains nothing" in err, (fmt, err)
    assert stored(tmp_path / "home") == []


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8,
                                     bytes((i * 37 + 11) % 255 + 1 for i in range(4096))], ids=["png", "no-nul"])
def test_binary_txt_file_is_called_binary_without_iconv_advice(content, tmp_path):
    path = tmp_path / "image.txt"
    path.write_bytes(content)
    err = refused(tmp_path / "home", "data", "add", "img", path)
    assert "is binary, not text" in err and "iconv" not in err and "latin" not in err.lower()


def test_utf16_file_gets_the_utf16_advice_and_reads_with_its_encoding(tmp_path):
    path = tmp_path / "u.txt"
    path.write_bytes("Grüße aus Köln".encode("utf-16"))
    home = tmp_path / "home"
    err = refused(home, "data", "add", "u", path)
    assert "is UTF-16 text" in err and "--encoding utf-16" in err and "latin1" not in err
    assert lqlora(home, "data", "add", "u", path, "--encoding", "utf-16")[0] == 0
    assert load_rows(lookup_dataset(Warehouse(home / "lqlora.duckdb"), "u"))["text"].tolist() == ["Grüße aus Köln"]
    path.write_bytes("plain words".encode("utf-16-le"))  # no byte-order mark: NULs, yet not binary
    err = refused(home, "data", "add", "le", path)
    assert "looks like UTF-16-LE text" in err and "--encoding utf-16-le" in err and "binary" not in err


def test_unknown_encoding_and_misplaced_options_are_refused(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "a"}\n')
    home = tmp_path / "home"
    assert "not a text encoding" in refused(home, "data", "add", "a", path, "--encoding", "klingon")
    assert "not a text encoding" in refused(home, "data", "add", "a", path, "--encoding", "hex")
    assert "leaves out files of a folder" in refused(home, "data", "add", "a", path, "--skip-unreadable")
    assert stored(home) == []


def _latin1_folder(folder: Path, n: int = 6) -> Path:
    folder.mkdir()
    for i in range(n):
        (folder / f"doc{i:02d}.txt").write_text(f"plain document number {i}\n")
    (folder / "doc03.txt").write_bytes("un caf\xe9 cr\xe8me, s'il vous pla\xeet\n".encode("latin-1"))
    return folder


def test_folder_with_one_latin1_file_names_it_and_offers_a_way_on(tmp_path):
    folder = _latin1_folder(tmp_path / "docs")
    err = refused(tmp_path / "home", "data", "add", "docs", folder)
    assert "1 of the 6 .txt files" in err and "doc03.txt: is not UTF-8 text (byte 0xe9 at offset 6)" in err
    assert "--encoding latin-1" in err and "--skip-unreadable" in err


def test_folder_read_as_latin1_keeps_every_file_and_its_checksum_says_how(tmp_path):
    folder = _latin1_folder(tmp_path / "docs")
    home = tmp_path / "home"
    rc, out, err = lqlora(home, "data", "add", "docs", folder, "--encoding", "latin-1")
    assert rc == 0 and "6 rows from txt-folder" in out, err
    spec = lookup_dataset(Warehouse(home / "lqlora.duckdb"), "docs")
    assert spec.reading.encoding == "iso8859-1" and "un café crème" in load_rows(spec)["text"][3]
    assert spec.sha256 != checksum(folder)  # the same bytes read as UTF-8 would be other text


def test_folder_with_skip_unreadable_reports_the_skipped_file_and_hashes_what_was_read(tmp_path):
    folder = _latin1_folder(tmp_path / "docs")
    home = tmp_path / "home"
    rc, out, _ = lqlora(home, "data", "add", "docs", folder, "--skip-unreadable")
    assert rc == 0 and "5 rows from txt-folder" in out
    assert "left out 1 of 6 files" in out and "doc03.txt: is not UTF-8 text (byte 0xe9 at offset 6)" in out
    w = Warehouse(home / "lqlora.duckdb")
    spec = lookup_dataset(w, "docs")
    assert spec.skipped == ("doc03.txt: is not UTF-8 text (byte 0xe9 at offset 6)",)
    assert load_rows(spec)["text"].tolist() == [f"plain document number {i}\n" for i in (0, 1, 2, 4, 5)]
    readable = tmp_path / "readable"
    readable.mkdir()
    for p in folder.iterdir():
        if p.name != "doc03.txt":
            (readable / p.name).write_bytes(p.read_bytes())
    assert spec.sha256 == checksum(readable)  # exactly the files read
    (folder / "doc03.txt").write_text("now it is UTF-8: café\n")  # the skipped file fixed: a new content id
    notes = []
    fresh = current(w, spec, log=notes.append)
    assert fresh.rows == 6 and fresh.skipped == () and fresh.sha256 == checksum(folder)
    assert "changed since it was registered (5 -> 6 rows)" in notes[0]


def test_a_file_that_cannot_be_read_is_a_message_or_left_out(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("a readable document")
    (folder / "b.txt").symlink_to("/proc/self/mem")  # a file whose read fails (EIO)
    home = tmp_path / "home"
    err = refused(home, "data", "add", "docs", folder)
    assert "b.txt: cannot be read (Input/output error)" in err and "--skip-unreadable" in err
    rc, out, _ = lqlora(home, "data", "add", "docs", folder, "--skip-unreadable")
    assert rc == 0 and "1 rows from txt-folder" in out and "b.txt: cannot be read" in out


# ---------- remove ----------

@pytest.mark.parametrize("name", ["sotu", "polarity"])
def test_removing_a_bundled_dataset_is_refused(name, tmp_path):
    rc, out, err = lqlora(tmp_path / "home", "data", "remove", name)
    assert rc == 2 and f"{name!r} is a bundled dataset" in err and "cannot be removed" in err
    assert "removed dataset" not in out + err and "Traceback" not in err


def test_removing_an_unknown_dataset_names_what_data_list_shows(tmp_path):
    home = tmp_path / "home"
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    assert lqlora(home, "data", "add", "mine", tmp_path / "a.jsonl")[0] == 0
    err = refused(home, "data", "remove", "nope")
    assert "no dataset 'nope' is registered" in err and "mine" in err and "polarity, sotu" in err
    assert "lqlora data list" in err
    rc, out, _ = lqlora(home, "data", "remove", "mine")
    assert rc == 0 and "removed dataset 'mine'" in out and stored(home) == []
    assert "no dataset 'mine' is registered" in refused(home, "data", "remove", "mine")


# ---------- concurrency ----------

def _cli(home: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the code of this checkout
    return subprocess.Popen([sys.executable, "-m", "lqlora_dagster.cli", "--home", str(home), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _has_reader(fifo: Path) -> int | None:
    """A write end of the pipe once a process has opened it to read, else None."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None


def _feed(fd: int, data: bytes) -> None:
    os.set_blocking(fd, True)
    os.write(fd, data)
    os.close(fd)


def _serve_until_exit(fifo: Path, data: bytes, proc: subprocess.Popen) -> None:
    """Give `data` to every later read of the pipe (a second read for a checksum)."""
    while proc.poll() is None:
        fd = _has_reader(fifo)
        if fd is None:
            time.sleep(0.01)
            continue
        _feed(fd, data)
        time.sleep(0.3)  # that reader sees the end before the pipe is opened again


def test_two_concurrent_adds_of_one_name_give_one_success_and_one_refusal(tmp_path):
    """Both processes pass the name check, then block reading their data file (a named
    pipe) until both are there: the barrier makes the race happen on every round."""
    for round_ in range(2):
        home, paths, texts = tmp_path / f"home{round_}", [], [b"text of A " * 20, b"text of B " * 20]
        for who in "AB":
            paths.append(tmp_path / f"{who}{round_}.txt")
            os.mkfifo(paths[-1])
        procs = [_cli(home, "data", "add", "same", p) for p in paths]
        fds, deadline = [None, None], time.monotonic() + 60
        while None in fds and time.monotonic() < deadline:
            fds = [fd if fd is not None else _has_reader(p) for fd, p in zip(fds, paths)]
            time.sleep(0.01)
        assert None not in fds, "a process never read its data file"
        for fd, data in zip(fds, texts):
            _feed(fd, data)
        servers = [threading.Thread(target=_serve_until_exit, args=a) for a in zip(paths, texts, procs)]
        for s in servers:
            s.start()
        results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        for s in servers:
            s.join()
        assert sorted(rc for rc, _, _ in results) == [0, 2], results
        winner = next(i for i, (rc, _, _) in enumerate(results) if rc == 0)
        loser_err = results[1 - winner][2]
        assert "dataset 'same' is already registered" in loser_err and "Traceback" not in loser_err
        assert "added dataset 'same'" in results[winner][1]
        table = registered_datasets(Warehouse(home / "lqlora.duckdb"))
        assert table["name"].tolist() == ["same"] and table["path"].tolist() == [str(paths[winner])]


LOCKSTEP = """
import os, sys, time
from pathlib import Path
from lqlora_dagster.pipeline.registry import register_model
from lqlora_dagster.store import warehouse

home, source, sync, me, other = sys.argv[1:6]
sync, opened, plain = Path(sync), [0], warehouse.Warehouse.connect


def in_step(self, *args, **kwargs):
    # every warehouse connection waits for the other process's connection of the same
    # number (or its end): a look-up in one and a write in another interleave every time
    opened[0] += 1
    (sync / f"{me}.{opened[0]}").touch()
    deadline = time.monotonic() + 10
    while not ((sync / f"{other}.{opened[0]}").exists() or (sync / f"{other}.done").exists()):
        if time.monotonic() > deadline:
            break
        time.sleep(0.002)
    return plain(self, *args, **kwargs)


warehouse.Warehouse.connect = in_step
try:
    print("added" if register_model(warehouse.Warehouse(Path(home) / "lqlora.duckdb"), "same", source) else "same")
except Exception as err:
    print(f"refused: {err}")
finally:
    (sync / f"{me}.done").touch()
"""


def test_two_concurrent_model_registrations_of_one_name_give_one_success_and_one_refusal(tmp_path, tiny_llama_folder):
    sources = [str(tiny_llama_folder), str(tmp_path / "copy")]
    shutil.copytree(tiny_llama_folder, sources[1])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for round_ in range(2):
        home, sync = tmp_path / f"home{round_}", tmp_path / f"sync{round_}"
        sync.mkdir()
        procs = [subprocess.Popen([sys.executable, "-c", LOCKSTEP, str(home), src, str(sync), me, other],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for src, me, other in zip(sources, "AB", "BA")]
        outs = [p.communicate(timeout=120) for p in procs]
        said = sorted(out.strip().split(":")[0] for out, _ in outs)
        assert said == ["added", "refused"], outs
        winner = sources[[out.strip() for out, _ in outs].index("added")]
        assert f"model 'same' is already registered from {winner}" in "".join(out for out, _ in outs)
        rows = Warehouse(home / "lqlora.duckdb").query("SELECT model, source FROM models")
        assert rows.values.tolist() == [["same", winner]]
