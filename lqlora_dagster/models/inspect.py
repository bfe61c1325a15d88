"""What registering a model would quantize, and whether its checkpoint can be trusted,
known before anything is written.

`inspect_targets` reads the config (from config.json, or a GGUF's metadata) and builds
the module tree on the meta device, so no weight is allocated; then it finds the targets
the pipeline will decompose and checks the whole checkpoint against that tree, reading
one tensor slice at a time (`checkpoint_checks`). A model transformers cannot build, one
with no targets, or a checkpoint that is incomplete, does not fit the architecture or
holds a NaN fails here with a message rather than in the middle of a run.
"""

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.models.checkpoint_checks import check_checkpoint, checkpoint_entries
from lqlora_dagster.models.kinds import model_kind
from lqlora_dagster.models.source import ParsedSource, gguf_copy, is_hf_folder, parse_source
from lqlora_dagster.models.targets import Target, find_targets


@dataclass(frozen=True)
class TargetSummary:
    source: str  # the normalised source
    architecture: str  # the model class built, e.g. "LlamaForCausalLM"
    targets: tuple[Target, ...]

    @property
    def n_params(self) -> int:
        return sum(t.numel for t in self.targets)

    def kinds(self) -> dict[str, list[Target]]:
        """Targets grouped by kind (last name component), in the model's order."""
        groups: dict[str, list[Target]] = defaultdict(list)
        for t in self.targets:
            groups[t.kind].append(t)
        return dict(groups)

    def lines(self) -> list[str]:
        """What the CLI prints: a count per kind with its shapes (rows x cols), then totals."""
        kinds = self.kinds()
        width = max(len(k) for k in kinds)
        out = [f"{self.architecture}: {len(self.targets)} target matrices in {len(kinds)} kinds"]
        for kind, group in kinds.items():
            shapes = ", ".join(f"{r} x {c}" for r, c in dict.fromkeys((t.rows, t.cols) for t in group))
            out.append(f"  {kind:<{width}}  {len(group):>4}  {shapes}")
        out.append(f"target parameters: {self.n_params:,}")
        return out


def _check_model_type(folder: Path) -> None:
    """An unknown model_type named plainly (transformers' own message is about checkpoints)."""
    # transformers loads on first use (0.6 s): commands that read no model skip it
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = json.loads((folder / "config.json").read_text())
    model_type = cfg.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    why = (
        "names no model_type"
        if model_type is None
        else f"names model_type {model_type!r}, which transformers {__version__} does not know"
    )
    fix = (
        "it needs the repository's own code (auto_map), which lqlora never runs"
        if "auto_map" in cfg
        else "upgrade transformers if the architecture is newer, or fix model_type"
    )
    raise LQLoRAInputError(f"{folder / 'config.json'} {why}; {fix}")


def load_config(source: ParsedSource, cache_dir: Path):
    """The transformers config, without dequantizing a GGUF that has no fp32 copy yet."""
    # transformers loads on first use (0.6 s): commands that read no model skip it
    from transformers import AutoConfig

    if source.gguf_file is not None and is_hf_folder(gguf_copy(source, cache_dir)):
        folder, gguf_file = gguf_copy(source, cache_dir), None
    else:
        folder, gguf_file = source.folder, source.gguf_file
    where = folder / gguf_file if gguf_file else folder / "config.json"
    if gguf_file is None:
        _check_model_type(folder)
    try:
        return (
            AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
            if gguf_file
            else AutoConfig.from_pretrained(folder)
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LQLoRAInputError(
            f"cannot read the model config from {where}: {err}; fix or replace the file"
        ) from err


def inspect_targets(source: str, pattern: str | None, cache_dir: Path) -> TargetSummary:
    """The targets a registration of `source` would decompose; raises if there are none,
    or if any stored tensor is missing, misshapen, non-finite or cut short."""
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as err:
            raise LQLoRAInputError(f"target pattern {pattern!r} is not a valid regex: {err}") from err
    parsed = parse_source(source)
    entries, fields = checkpoint_entries(parsed)  # the files are whole before any reader trusts them
    config = load_config(parsed, cache_dir)
    try:
        with torch.device("meta"):
            net = model_kind(parsed.task).from_config(config)
    except (ValueError, KeyError, TypeError, NotImplementedError) as err:
        raise LQLoRAInputError(
            f"transformers cannot build a {parsed.task} model from {parsed.key}'s config "
            f"({type(config).__name__}): {err}"
        ) from err
    targets = tuple(find_targets(net, pattern))
    check_checkpoint(parsed, net, config, entries, fields)
    return TargetSummary(parsed.key, type(net).__name__, targets)
