"""A user's dataset: which task its columns serve, checked once when it is added.

| task     | columns (first match wins)                                      | trains on           |
| instruct | `messages` (chat turns), or `prompt`+`response` (also named     | response tokens     |
|          | question/answer, completion), or `instruction`(+`input`)+`output` |                   |
| classify | `text` + `label` (strings or integers; labels discovered)       | the label           |
| lm       | `text` (a .txt file or a folder of them is one `text` column)   | every token         |

`--task` forces a task and `--*-col` names the columns when they are called otherwise.
A cell holding a list of strings (several reference answers) stands for its first.
Every problem found here (a missing column, one class, mixed label types, an empty
file or row, a cell of the wrong kind, text that is not UTF-8) is an error before
anything is stored. How the file's bytes were read (`Reading`: encoding, files left
out of a folder) is part of the spec, so every later read sees the same rows.
"""

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lqlora_dagster.data.checks import (
    check_messages,
    check_optional_text,
    check_text,
    discover_labels,
    first_text,
)
from lqlora_dagster.data.files import Reading, Table, read_table
from lqlora_dagster.errors import LQLoRAInputError

TASKS = ("lm", "instruct", "classify")


@dataclass(frozen=True)
class Columns:
    """Which column holds what (None: not used by the task)."""

    text: str | None = None
    label: str | None = None
    prompt: str | None = None
    input: str | None = None  # optional second part of an instruction (Alpaca's `input`)
    response: str | None = None
    messages: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: one row of DuckDB `datasets`."""

    name: str
    path: str
    format: str
    task: str
    rows: int
    columns: tuple[str, ...]  # every column in the file
    sha256: str
    use: Columns = field(default_factory=Columns)
    labels: tuple[str, ...] = ()  # classify: the distinct labels, in the head's output order
    reading: Reading = field(default_factory=Reading)
    skipped: tuple[str, ...] = ()  # "name: why" of a folder's files left out (--skip-unreadable)

    def record(self) -> dict:
        return {
            "name": self.name, "path": self.path, "format": self.format, "task": self.task, "rows": self.rows,
            "columns": json.dumps(list(self.columns)), "sha256": self.sha256,
            "use": json.dumps({k: v for k, v in vars(self.use).items() if v is not None}),
            "labels": json.dumps(list(self.labels)),
            "reading": json.dumps({**vars(self.reading), "skipped": list(self.skipped)}),
        }

    @classmethod
    def from_record(cls, row: dict) -> "DatasetSpec":
        reading = json.loads(row["reading"]) if isinstance(row.get("reading"), str) else {}  # NULL: added before
        skipped = tuple(reading.pop("skipped", ()))
        return cls(
            row["name"], row["path"], row["format"], row["task"], int(row["rows"]), tuple(json.loads(row["columns"])),
            row["sha256"], Columns(**json.loads(row["use"])), tuple(json.loads(row["labels"])), Reading(**reading),
            skipped,
        )


def _missing(what: str, wanted: list[str], found: list[str]) -> LQLoRAInputError:
    near = sorted({m for w in wanted for m in difflib.get_close_matches(w, found, n=1, cutoff=0.6)})
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    return LQLoRAInputError(
        f"{what} needs column(s) {', '.join(repr(w) for w in wanted)}; the file has {', '.join(repr(f) for f in found)}"
        f"{hint} Name yours with --text-col / --label-col / --prompt-col / --response-col"
    )


def choose_columns(found: list[str], task: str | None, named: Columns) -> tuple[str, Columns]:
    """(task, columns) from the column names, the user's --task and --*-col flags."""
    for col in (c for c in vars(named).values() if c is not None):
        if col not in found:
            near = difflib.get_close_matches(col, found, n=1, cutoff=0.6)
            raise LQLoRAInputError(
                f"column {col!r} is not in the file; it has {', '.join(repr(f) for f in found)}"
                + (f"; did you mean {near[0]!r}?" if near else "")
            )
    has = set(found)

    def pick(given: str | None, *defaults: str) -> str | None:
        return given or next((d for d in defaults if d in has), None)

    messages = pick(named.messages, "messages", "conversations")
    prompt, response = pick(named.prompt, "prompt", "instruction", "question"), pick(named.response, "response", "output", "answer", "completion")
    text, label = pick(named.text, "text", "sentence"), pick(named.label, "label", "labels")
    if task is None:
        task = "instruct" if messages or (prompt and response) else "classify" if text and label else "lm"
    if task not in TASKS:
        raise LQLoRAInputError(f"unknown dataset task {task!r}; use one of {', '.join(TASKS)}")
    if task == "instruct":
        if messages and not (named.prompt or named.response):
            return task, Columns(messages=messages)
        if not (prompt and response):
            raise _missing("an instruction dataset (or a `messages` column)", ["prompt", "response"], found)
        extra = pick(named.input, "input") if prompt == "instruction" or named.input else None
        return task, Columns(prompt=prompt, input=extra, response=response)
    if task == "classify":
        if not (text and label):
            raise _missing("a classification dataset", ["text", "label"], found)
        return task, Columns(text=text, label=label)
    if not text:
        raise _missing("a language-modelling dataset", ["text"], found)
    return task, Columns(text=text)


_TEXT_ROLES = ("text", "prompt", "response")


def _check_columns(table: Table, use: Columns) -> None:
    """Every cell the task reads holds what its role needs."""
    for role in _TEXT_ROLES:
        column = getattr(use, role)
        if column is not None:
            check_text(table.frame[column], column, role, table.where, table.types)
    if use.input:
        check_optional_text(table.frame[use.input], use.input, table.where, table.types)
    if use.messages:
        check_messages(table.frame[use.messages], use.messages, table.where)


def inspect_dataset(name: str, path: Path, task: str | None = None, named: Columns = Columns(),
                    reading: Reading = Reading()) -> DatasetSpec:
    """Read the file, choose its task and columns, check every row: the spec to register."""
    if not str(path).strip():
        raise LQLoRAInputError("the data path is empty; give a data file or a folder of .txt files")
    path = Path(path).expanduser().resolve()
    reading = reading.checked()
    table = read_table(path, reading)
    found = [str(c) for c in table.frame.columns]
    task, use = choose_columns(found, task, named)
    _check_columns(table, use)
    labels = discover_labels(table.frame[use.label], use.label, table.where, table.types) if task == "classify" else ()
    return DatasetSpec(name, str(path), table.format, task, len(table.frame), tuple(found), table.sha256, use, labels,
                       reading, tuple(table.skipped))


def load_rows(spec: DatasetSpec) -> pd.DataFrame:
    """The dataset's rows, re-read from its file the way it was registered; a text cell
    holding a list of strings is its first string."""
    frame = read_table(Path(spec.path), spec.reading).frame
    for role in _TEXT_ROLES:
        column = getattr(spec.use, role)
        if column is not None and column in frame:
            frame[column] = frame[column].map(first_text)
    return frame
