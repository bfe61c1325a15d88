"""CLI flags derived from the knobs of each stage's settings (`knobs.py`): a knob's
flag, type, choices and help come from its one definition, and the flags a user gave
come back as per-stage overrides of a `PipelineSettings`."""

import argparse
import typing

from lqlora_dagster.knobs import default_of, knob_fields, optional_inner
from lqlora_dagster.pipeline.settings import STAGE_SETTINGS

_SEP = "::"  # argparse dest: "<stage>::<knob>"


def flags_of(cls, name: str, flags: tuple[str, ...] | None) -> tuple[str, ...]:
    return flags if flags is not None else (f"--{cls.cli_prefix}{name.replace('_', '-')}",)


def _escaped(text: str) -> str:
    """argparse %-formats help: a knob saying "100% high" would break --help."""
    return text.replace("%", "%%")


def _show(value) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return str(value)


def add_knob_flags(
    parser: argparse.ArgumentParser, stages: list[str] | None = None, skip: set[str] = frozenset(),
    classes: dict[str, type] = STAGE_SETTINGS,
) -> None:
    """One flag per knob of each stage (default: all; `skip` names "stage.knob"s a preset
    decides), grouped by stage in --help. Flags not given leave the settings' (or a
    preset's) value alone."""
    for stage in stages or list(classes):
        cls = classes[stage]
        group = parser.add_argument_group(f"{stage} settings")
        for f, k, tp in knob_fields(cls):
            flags = flags_of(cls, f.name, k.flags)
            if not flags or f"{stage}.{f.name}" in skip:
                continue
            default = default_of(f)
            options: dict = {"dest": f"{stage}{_SEP}{f.name}", "default": argparse.SUPPRESS, "metavar": f.name.upper()}
            if tp is bool:
                del options["metavar"]
                text = k.describe_value(f.name, not default)
                options.update(action="store_const", const=not default,
                               help=_escaped(f"{text} (sets {f.name} to {str(not default).lower()}; "
                                             f"default {str(default).lower()})"))
            else:
                inner = optional_inner(tp) or tp
                many = typing.get_origin(inner) is tuple
                element = typing.get_args(inner)[0] if many else inner
                options.update(type=element, help=_escaped(f"{k.help} (default: {_show(default)})"))
                if many:  # a list flag given with no values selects nothing: argparse refuses it
                    options["nargs"] = "+"
                if k.choices is not None:
                    options["choices"] = list(k.choices)
                    del options["metavar"]
            group.add_argument(*flags, **options)


def stage_overrides(args: argparse.Namespace) -> dict[str, dict]:
    """{stage: {knob: value}} for the knob flags the user gave."""
    out: dict[str, dict] = {}
    for dest, value in vars(args).items():
        if _SEP in dest:
            stage, name = dest.split(_SEP)
            out.setdefault(stage, {})[name] = tuple(value) if isinstance(value, list) else value
    return out
