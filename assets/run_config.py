"""Dagster config classes derived from the settings dataclasses (`knobs.py`), so the
launchpad shows each knob with the help, default and choices written once in
`lqlora_dagster/pipeline/settings.py`, and `config.settings()` gives the typed settings."""

import typing
from typing import Literal

import dagster as dg
from pydantic import Field

from lqlora_dagster.knobs import default_of, from_values, knob_fields, optional_inner


def _config_type(tp, choices: tuple | None):
    """The pydantic/Dagster type for a settings field's type."""
    inner = optional_inner(tp)
    if inner is not None:
        return typing.Optional[_config_type(inner, choices)]  # noqa: UP045 (Dagster reads Optional)
    origin = typing.get_origin(tp)
    if origin is tuple:
        return list[typing.get_args(tp)[0]]
    if origin is dict:
        key, value = typing.get_args(tp)
        return dict[key, _config_type(value, None)]
    if choices is not None:
        return Literal[tuple(choices)]
    return tp


def config_class(settings_cls: type) -> type[dg.Config]:
    """A `dg.Config` with one field per knob of `settings_cls` and a `settings()` method."""
    annotations, namespace = {}, {}
    for f, k, tp in knob_fields(settings_cls):
        choices = k.choices if typing.get_origin(tp) is not tuple else None
        annotations[f.name] = _config_type(tp, choices)
        default = default_of(f)
        default = list(default) if isinstance(default, tuple) else default
        namespace[f.name] = Field(default=default, description=k.help)

    def settings(self):
        return from_values(settings_cls, self.model_dump())

    namespace["__annotations__"] = annotations
    namespace["__doc__"] = settings_cls.__doc__
    namespace["settings"] = settings
    name = settings_cls.__name__.removesuffix("Settings") + "Config"
    return type(name, (dg.Config,), namespace)
