"""A user's dataset: which task its columns serve, checked once when it is added.

| task     | columns (first match wins)                                      | trains on           |
| instruct | `messages` (chat turns), or `prompt`+`response` (also named     | response tokens     |
|          | question/answer, completion), or `instruction`(+`input`)+`output` |                   |
| classify | `text` + `label` (strings or integers; labels discovered)       | the label           |
| lm       | `text` (a .txt file or a folder of them is one `text` column)   | every token         |

`--task` forces a task and `--*-col` names the columns when they are called otherwise.
A cell holding a list of strings (several reference answers) stands for its first.
Every problem found here (a missing column, one class, mixed label types, an empty
file, text that is not UTF-8) is an error before anything is stored.
"""

import difflib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from lqlora_dagster.data.files import checksum, read_rows
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

    def record(self) -> dict:
        return {
            "name": self.name, "path": self.path, "format": self.format, "task": self.task, "rows": self.rows,
            "columns": json.dumps(list(self.columns)), "sha256": self.sha256,
            "use": json.dumps({k: v for k, v in vars(self.use).items() if v is not None}),
            "labels": json.dumps(list(self.labels)),
        }

    @classmethod
    def from_record(cls, row: dict) -> "DatasetSpec":
        return cls(
            row["name"], row["path"], row["format"], row["task"], int(row["rows"]), tuple(json.loads(row["columns"])),
            row["sha256"], Columns(**json.loads(row["use"])), tuple(json.loads(row["labels"])),
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


def label_key(value) -> str:
    """A label as the string the head's label list holds (1, 1.0 and '1' agree)."""
    if isinstance(value, str):
        value = value.strip()
        # DuckDB reads a JSON column of mixed types as JSON text: '"neg"' is the string neg
        return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
    number = float(value)
    return str(int(number)) if number.is_integer() else str(number)


def discover_labels(values: pd.Series, column: str) -> tuple[str, ...]:
    if values.isna().any():
        raise LQLoRAInputError(f"{int(values.isna().sum())} row(s) have no {column!r}; give every row a label")
    keys = [label_key(v) for v in values]

    def numeric(k: str) -> bool:
        try:
            float(k)
            return True
        except ValueError:
            return False

    kinds = {numeric(k) for k in keys}
    if len(kinds) > 1:
        num = next(k for k in keys if numeric(k))
        word = next(k for k in keys if not numeric(k))
        raise LQLoRAInputError(
            f"column {column!r} mixes number and text labels (e.g. {num!r} and {word!r}); use one kind for every row"
        )
    distinct = sorted(set(keys), key=float) if kinds == {True} else sorted(set(keys))
    if len(distinct) < 2:
        raise LQLoRAInputError(
            f"column {column!r} has one class only ({distinct[0]!r}); a classifier needs at least two labels"
        )
    return tuple(distinct)


def _check_messages(values: pd.Series, column: str) -> None:
    for i, turns in enumerate(values):
        turns = list(turns) if turns is not None and not isinstance(turns, str) else None
        if not turns or not all(isinstance(t, dict) and "role" in t and "content" in t for t in turns):
            raise LQLoRAInputError(
                f"row {i} of {column!r} is not a list of {{role, content}} turns; a chat row looks like "
                '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'
            )
        if turns[-1]["role"] != "assistant":
            raise LQLoRAInputError(f"row {i} of {column!r} does not end with an assistant turn (the response to learn)")


def first_text(value):
    """A cell as text: a list of strings (several reference answers) gives its first."""
    if not isinstance(value, str) and hasattr(value, "__len__") and len(value) and isinstance(value[0], str):
        return value[0]
    return value


def _check_text(values: pd.Series, column: str) -> None:
    bad = [i for i, v in enumerate(values) if not isinstance(first_text(v), str)]
    if bad:
        raise LQLoRAInputError(
            f"column {column!r} must hold text; row {bad[0]} holds {str(values.iloc[bad[0]])!r} ({len(bad)} such row(s))"
        )


def inspect_dataset(name: str, path: Path, task: str | None = None, named: Columns = Columns()) -> DatasetSpec:
    """Read the file, choose its task and columns, check every row: the spec to register."""
    path = Path(path).expanduser().resolve()
    fmt, frame = read_rows(path)
    found = [str(c) for c in frame.columns]
    task, use = choose_columns(found, task, named)
    for col in (use.text, use.prompt, use.response):
        if col is not None:
            _check_text(frame[col], col)
    if use.messages:
        _check_messages(frame[use.messages], use.messages)
    spec = DatasetSpec(name, str(path), fmt, task, len(frame), tuple(found), checksum(path), use)
    if task == "classify":
        spec = replace(spec, labels=discover_labels(frame[use.label], use.label))
    return spec


def load_rows(spec: DatasetSpec) -> pd.DataFrame:
    """The dataset's rows, re-read from its file (whose checksum must still match)."""
    _, frame = read_rows(Path(spec.path))
    return frame
