"""Which layers of a model get quantized.

By default, PEFT's "all-linear" convention: every layer of a registered type
(`layer_types.py`: nn.Linear, GPT-2 Conv1D) inside the repeated transformer blocks
(a module path with a block index, `.3.`), so never the embeddings, the LM head or a
classifier head, on any architecture. Mixture-of-experts routers (`gate`, `router`)
stay in full precision. A regex over module names (`--pattern`) selects others.
GPT-2's Conv1D stores its weight as (in, out), so targets record `transposed`.
"""

import re
from dataclasses import dataclass

import torch

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.models.layer_types import LAYER_TYPES, layer_type_of

_LAYER_INDEX = re.compile(r"\.(\d+)\.")
_ROUTERS = {"gate", "router"}  # MoE routers: tiny, and they pick the experts; kept dense


@dataclass(frozen=True)
class Target:
    name: str  # module path, e.g. "model.layers.3.self_attn.q_proj"
    rows: int  # out features
    cols: int  # in features
    layer: int  # block index, -1 if none
    kind: str  # last path component, e.g. "q_proj"
    transposed: bool  # weight stored as (in, out) (GPT-2 Conv1D)

    @property
    def numel(self) -> int:
        return self.rows * self.cols


def _in_a_block(name: str, module: torch.nn.Module) -> bool:
    """The all-linear default: a wrappable layer inside a repeated block, not a router."""
    return bool(_LAYER_INDEX.search(name)) and name.rsplit(".", 1)[-1] not in _ROUTERS and (
        _decomposed_layout(module) is not None or layer_type_of(module) is not None
    )


def _decomposed_layout(module: torch.nn.Module) -> tuple[int, int, bool] | None:
    """(rows, cols, transposed) of the layer an already decomposed one replaced (an
    `LQLinear` says so itself; this package stays below the one that defines it)."""
    return getattr(module, "decomposed_layout", None)


def find_targets(model: torch.nn.Module, pattern: str | None = None) -> list[Target]:
    """Every module whose name matches `pattern` (default: all linear layers inside
    the repeated blocks)."""
    try:
        regex = re.compile(pattern) if pattern is not None else None
    except re.error as err:
        raise LQLoRAInputError(f"target pattern {pattern!r} is not a valid regex: {err}") from err
    targets = []
    for name, module in model.named_modules():
        if not name or not (regex.search(name) if regex is not None else _in_a_block(name, module)):
            continue
        if (layout := _decomposed_layout(module)) is not None:  # already decomposed: its original layout
            rows, cols, transposed = layout
        elif (kind := layer_type_of(module)) is not None:
            (rows, cols), transposed = kind.shape(module), kind.transposed
        else:
            raise LQLoRAInputError(
                f"module {name!r} matches the target pattern but is a {type(module).__name__}, which cannot "
                f"be wrapped; only {', '.join(t.name for t in LAYER_TYPES)} can. Narrow the pattern"
            )
        found = _LAYER_INDEX.search(name)
        targets.append(
            Target(
                name, rows, cols, int(found.group(1)) if found else -1, name.rsplit(".", 1)[-1], transposed
            )
        )
    if not targets:
        what = f"target pattern {pattern!r} matches" if pattern is not None else "the default (every linear layer in a repeated block) finds"
        raise LQLoRAInputError(
            f"{what} no module of this {type(model).__name__}; pass --pattern, a regex over module "
            "names (list them with `[n for n, _ in model.named_modules()]`)"
        )
    return targets


def target_weight(model: torch.nn.Module, target: Target) -> torch.Tensor:
    """The (out, in) weight of a target, a view, whatever its storage layout."""
    weight = model.get_submodule(target.name).weight
    return weight.T if target.transposed else weight
