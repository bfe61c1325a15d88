"""Every cell a task reads is checked by kind, so no value the file holds can reach a
tokenizer or a label index as something else.

A text cell is a non-empty string (or a list whose first item is one: several
reference answers); a label is one string, integer, boolean or finite number; a chat
row is a list of {role, content} turns ending with the assistant's. A row with empty
text is refused in every format alike (it would train nothing), with where it is. Rows
count from 0 in file order; the line (or file) an editor shows is given beside them.
"""

import math
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal

import numpy as np
import pandas as pd

from lqlora_dagster.errors import LQLoRAInputError

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")
_LISTS = (list, tuple, np.ndarray)
_SHOWN = 5  # rows named in a message


def is_missing(value) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def kind(value) -> str:
    """What a cell holds, in words."""
    if is_missing(value):
        return "nothing"
    for types, word in ((str, "a string"), ((bool, np.bool_), "a boolean"), ((int, np.integer), "an integer"),
                        ((float, np.floating, Decimal), "a number"), (dict, "an object"), (_LISTS, "a list"),
                        ((bytes, bytearray, memoryview), "bytes")):
        if isinstance(value, types):
            return word
    return f"a {type(value).__name__}"


def first_text(value):
    """A cell as text: a list whose first item is a string (several reference answers) gives it."""
    if isinstance(value, _LISTS) and len(value) and isinstance(value[0], str):
        return value[0]
    return value


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape such as "\ud800"
        return False


def _show(value) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _row(i: int, where: Sequence[str]) -> str:
    return f"row {i}" + (f" ({where[i]})" if i < len(where) and where[i] else "")


def _rows(indices: list[int], where: Sequence[str]) -> str:
    more = f" and {len(indices) - _SHOWN:,} more" if len(indices) > _SHOWN else ""
    return ", ".join(_row(i, where) for i in indices[:_SHOWN]) + more


def _typed(column: str, types: Mapping[str, str]) -> str:
    return f"; the file declares {column!r} as {types[column]}" if column in types else ""


def check_text(values: pd.Series, column: str, role: str, where: list[str], types: dict[str, str]) -> None:
    """Every row holds non-empty text that a tokenizer can encode."""
    cells = [first_text(v) for v in values]
    wrong = [i for i, v in enumerate(cells) if not is_missing(v) and not isinstance(v, str)]
    if wrong:
        i, raw = wrong[0], values.iloc[wrong[0]]
        at = f"{where[i]}, " if i < len(where) and where[i] else ""
        raise LQLoRAInputError(
            f"column {column!r} must hold text; row {i} holds {_show(raw)!r} ({at}{kind(raw)}{_typed(column, types)}); "
            f"{len(wrong):,} such row(s): store the {role} as strings, or name another column with --{role}-col"
        )
    empty = [i for i, v in enumerate(cells) if is_missing(v) or not v.strip()]
    if empty:
        raise LQLoRAInputError(
            f"column {column!r} is empty in {len(empty):,} of {len(cells):,} row(s): {_rows(empty, where)}; a row "
            f"without its {role} trains nothing: fill those rows in or remove them"
        )
    broken = [i for i, v in enumerate(cells) if not _encodes(v)]
    if broken:
        raise LQLoRAInputError(
            f"column {column!r} holds text that is not valid Unicode (a lone surrogate, e.g. a JSON \\ud800 escape) "
            f"in {_rows(broken, where)}; fix those rows"
        )


def check_optional_text(values: pd.Series, column: str, where: list[str], types: dict[str, str]) -> None:
    """An optional part (Alpaca's `input`): empty is fine, anything but text is not."""
    wrong = [i for i, v in enumerate(values) if not is_missing(first_text(v)) and not isinstance(first_text(v), str)]
    if wrong:
        raw = values.iloc[wrong[0]]
        raise LQLoRAInputError(
            f"column {column!r} must hold text; {_row(wrong[0], where)} holds {_show(raw)!r} "
            f"({kind(raw)}{_typed(column, types)}); {len(wrong):,} such row(s)"
        )


def label_key(value) -> str:
    """A label as the string the head's label list holds (1, 1.0, '1' and '1.0' agree)."""
    if isinstance(value, str):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':  # a JSON-quoted string
            value = value[1:-1]
        if _INTEGER.fullmatch(value):
            return str(int(value))
        if not _NUMBER.fullmatch(value):
            return value
    if isinstance(value, (bool, np.bool_, int, np.integer)):
        return str(int(value))
    number = float(value)
    return str(int(number)) if number.is_integer() else str(number)


def _label_like(value) -> bool:
    if isinstance(value, (str, bool, np.bool_, int, np.integer)):
        return True
    return isinstance(value, (float, np.floating, Decimal)) and math.isfinite(value)


def discover_labels(values: pd.Series, column: str, where: Sequence[str] = (),
                    types: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The distinct labels in the head's output order (numbers by value, words sorted)."""
    where, types = list(where), dict(types or {})
    missing = [i for i, v in enumerate(values) if is_missing(v) or (isinstance(v, str) and not v.strip())]
    if missing:
        raise LQLoRAInputError(
            f"{len(missing):,} row(s) have no {column!r} ({_rows(missing, where)}); give every row a label"
        )
    wrong = [i for i, v in enumerate(values) if not _label_like(v)]
    if wrong:
        raw = values.iloc[wrong[0]]
        raise LQLoRAInputError(
            f"column {column!r} must hold one string or number per row; {_row(wrong[0], where)} holds "
            f"{_show(raw)!r} ({kind(raw)}{_typed(column, types)}); {len(wrong):,} such row(s)"
        )
    keys = [label_key(v) for v in values]
    kinds = {bool(_NUMBER.fullmatch(k)) for k in keys}
    if len(kinds) > 1:
        num = next(k for k in keys if _NUMBER.fullmatch(k))
        word = next(k for k in keys if not _NUMBER.fullmatch(k))
        raise LQLoRAInputError(
            f"column {column!r} mixes number and text labels (e.g. {num!r} and {word!r}); use one kind for every row"
        )
    distinct = sorted(set(keys), key=float) if kinds == {True} else sorted(set(keys))
    if len(distinct) < 2:
        raise LQLoRAInputError(
            f"column {column!r} has one class only ({distinct[0]!r}); a classifier needs at least two labels"
        )
    return tuple(distinct)


def _turns_ok(turns) -> bool:
    return bool(turns) and all(
        isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
        and _encodes(t["content"]) for t in turns
    )


def check_messages(values: pd.Series, column: str, where: Sequence[str] = ()) -> None:
    """Every row is a chat: {role, content} turns, the last the assistant's, not empty."""
    where = list(where)
    for i, turns in enumerate(values):
        turns = list(turns) if isinstance(turns, _LISTS) else None
        if not _turns_ok(turns):
            raise LQLoRAInputError(
                f"{_row(i, where)} of {column!r} is not a list of {{role, content}} turns with text content (it "
                f"holds {kind(values.iloc[i])}); a chat row looks like "
                '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'
            )
        if turns[-1]["role"] != "assistant":
            raise LQLoRAInputError(
                f"{_row(i, where)} of {column!r} does not end with an assistant turn (the response to learn)"
            )
        if not turns[-1]["content"].strip():
            raise LQLoRAInputError(f"{_row(i, where)} of {column!r} ends with an empty assistant turn: nothing to learn")
