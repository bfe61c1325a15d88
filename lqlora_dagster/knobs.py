"""One definition per knob: a settings-dataclass field that carries its help and bounds.

A knob is declared once, as `name: type = knob(default, "help", ge=..., choices=...)` in
a frozen settings dataclass. Everything else is derived from that field: the check in
`__post_init__` (`check_knobs`), the CLI flag (`cli_args.py`), the Dagster launchpad
schema (`assets/run_config.py`) and the run config (`knob_values`). So adding a knob is an
edit in one place plus its use.

Supported types: bool, int, float, str, `X | None`, `tuple[X, ...]` and
`dict[str, tuple[X, ...]]` (tuples travel as lists in Dagster and JSON).
"""

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from lqlora_dagster.errors import LQLoRAInputError


@dataclass(frozen=True)
class Knob:
    """What a settings field means to a user: help, bounds, allowed values, CLI flags."""

    help: str  # for a bool: what true means
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None  # allowed values (for tuples: of each element)
    nonempty: bool = False  # tuples: at least one element
    # CLI flags: None derives `--{prefix}{name}`; () keeps the knob off the CLI. A bool
    # flag flips the default (`--no-confirm` for a default of True).
    flags: tuple[str, ...] | None = None
    off: str | None = None  # for a bool: what false means (its flag's help when the default is true)

    def describe_value(self, name: str, value: bool) -> str:
        """What setting a bool knob to `value` does, in words: a flag's help is the
        description of the value it sets, never of the default it flips."""
        if value:
            return self.help
        if self.off is None:
            raise ValueError(f"bool knob {name!r} needs `off` (what false means) to describe its flag")
        return self.off


def knob(default: Any, help: str, **meta) -> Any:
    """A dataclass field declaring one knob (mutable defaults are copied per instance)."""
    spec = Knob(help, **meta)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"knob": spec})
    return dataclasses.field(default=default, metadata={"knob": spec})


def knob_fields(cls_or_obj) -> list[tuple[dataclasses.Field, Knob, Any]]:
    """(field, knob, resolved type) for every knob of a settings class, in order."""
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    hints = typing.get_type_hints(cls)
    return [(f, f.metadata["knob"], hints[f.name]) for f in dataclasses.fields(cls) if "knob" in f.metadata]


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def optional_inner(tp) -> Any | None:
    """X for `X | None`, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _describe(k: Knob) -> str:
    """The bounds as a reader writes them: '>= 1', 'in [0, 1)', or ''."""
    low = (k.ge, "[") if k.ge is not None else (k.gt, "(") if k.gt is not None else None
    high = (k.le, "]") if k.le is not None else (k.lt, ")") if k.lt is not None else None
    if low and high:
        return f" in {low[1]}{low[0]:g}, {high[0]:g}{high[1]}"
    if low:
        return f" {'>=' if low[1] == '[' else '>'} {low[0]:g}"
    if high:
        return f" {'<=' if high[1] == ']' else '<'} {high[0]:g}"
    return ""


def _check_scalar(name: str, value: Any, tp, k: Knob) -> None:
    if tp is bool:
        if not isinstance(value, bool):
            raise LQLoRAInputError(f"{name} must be true or false, got {value!r}")
        return
    kind = "an integer" if tp is int else "a number"
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise LQLoRAInputError(f"{name} must be {kind}{_describe(k)}, got {value!r}")
    if tp is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise LQLoRAInputError(f"{name} must be {kind}{_describe(k)}, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise LQLoRAInputError(f"{name} must be text, got {value!r}")
    if k.choices is not None and value not in k.choices:
        raise LQLoRAInputError(f"unknown {name} {value!r}; choose from {', '.join(map(str, k.choices))}")
    ok = all(
        bound is None or test(value, bound)
        for bound, test in (
            (k.ge, lambda v, b: v >= b),
            (k.gt, lambda v, b: v > b),
            (k.le, lambda v, b: v <= b),
            (k.lt, lambda v, b: v < b),
        )
    )
    if not ok:
        raise LQLoRAInputError(f"{name} must be {kind}{_describe(k)}, got {value!r}")


def check_knobs(settings) -> None:
    """Type, bounds and choices of every knob; call from `__post_init__`."""
    for f, k, tp in knob_fields(settings):
        value = getattr(settings, f.name)
        inner = optional_inner(tp)
        if inner is not None:
            if value is not None:
                _check_scalar(f.name, value, inner, k)
            continue
        origin = typing.get_origin(tp)
        if origin is tuple:
            if not isinstance(value, tuple):
                raise LQLoRAInputError(f"{f.name} must be a list, got {value!r}")
            if k.nonempty and not value:
                raise LQLoRAInputError(f"{f.name} needs at least one value")
            unknown = [v for v in value if k.choices is not None and v not in k.choices]
            if unknown:
                raise LQLoRAInputError(f"unknown {f.name} {unknown}; choose from {', '.join(map(str, k.choices))}")
            for v in value:
                _check_scalar(f.name, v, typing.get_args(tp)[0], k)
        elif origin is dict:
            if not isinstance(value, dict):
                raise LQLoRAInputError(f"{f.name} must be a mapping, got {value!r}")
        else:
            _check_scalar(f.name, value, tp, k)


def coerce(tp, value: Any) -> Any:
    """A value from JSON, Dagster or the CLI (lists, ints for floats) as the field's type,
    dataclasses (settings, handles) rebuilt from their mappings."""
    if value is None:
        return None
    inner = optional_inner(tp)
    if inner is not None:
        return coerce(inner, value)
    origin = typing.get_origin(tp)
    if origin is tuple:
        return tuple(coerce(typing.get_args(tp)[0], v) for v in value)
    if origin is list:
        return [coerce(typing.get_args(tp)[0], v) for v in value]
    if origin is dict:
        _, value_tp = typing.get_args(tp)
        return {str(key): coerce(value_tp, v) for key, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if dataclasses.is_dataclass(tp):
        return from_values(tp, value)
    return value


def from_values(cls, values: dict):
    """Settings from a plain mapping (a run config, JSON); unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise LQLoRAInputError(f"unknown settings {unknown} for {cls.__name__}; known: {sorted(names)}")
    return cls(**{name: coerce(hints[name], value) for name, value in values.items()})


def plain(value: Any) -> Any:
    """Tuples as lists, recursively: what Dagster's config and JSON take."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def knob_values(settings) -> dict[str, Any]:
    """{knob name: value} as plain JSON values (the run config of one stage)."""
    return {f.name: plain(getattr(settings, f.name)) for f, _, _ in knob_fields(settings)}
