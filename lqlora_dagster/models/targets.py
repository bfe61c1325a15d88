"""Which linear layers of a model get quantized: regex over module names.

Defaults per architecture (Llama-style `*_proj`, BERT-style `query|key|value|dense`,
GPT-2 `c_attn|c_proj|c_fc`); any architecture works with an explicit pattern.
GPT-2's Conv1D stores its weight as (in, out), so targets record `transposed`.
"""

import re
from dataclasses import dataclass

import torch

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.models.layer_types import LAYER_TYPES, layer_type_of
from lqlora_dagster.surgery.lq_linear import LQLinear

DEFAULT_TARGETS: dict[str, str] = {
    "llama": r"\.(q|k|v|o|gate|up|down)_proj$",
    "mistral": r"\.(q|k|v|o|gate|up|down)_proj$",
    "qwen2": r"\.(q|k|v|o|gate|up|down)_proj$",
    "qwen3": r"\.(q|k|v|o|gate|up|down)_proj$",
    "phi3": r"\.(qkv|o|gate_up|down)_proj$",
    "bert": r"encoder\.layer\.\d+\..*(query|key|value|dense)$",
    "roberta": r"encoder\.layer\.\d+\..*(query|key|value|dense)$",
    "gpt2": r"\.(c_attn|c_proj|c_fc)$",
}
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


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


def default_pattern(model: torch.nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise LQLoRAInputError(
            f"no default target modules for architecture {model_type!r}; pass a regex over "
            f"module names (known defaults: {', '.join(sorted(DEFAULT_TARGETS))})"
        )
    return DEFAULT_TARGETS[model_type]


def find_targets(model: torch.nn.Module, pattern: str | None = None) -> list[Target]:
    """Every module whose name matches `pattern` (default: by architecture)."""
    regex_text = pattern if pattern is not None else default_pattern(model)
    try:
        regex = re.compile(regex_text)
    except re.error as err:
        raise LQLoRAInputError(f"target pattern {regex_text!r} is not a valid regex: {err}") from err
    targets = []
    for name, module in model.named_modules():
        if not name or not regex.search(name):
            continue
        if isinstance(module, LQLinear):  # already decomposed: its original layout
            rows, cols, transposed = module.out_features, module.in_features, module.transposed
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
        raise LQLoRAInputError(
            f"target pattern {regex_text!r} matches no module of this {type(model).__name__}; "
            "list names with `[n for n, _ in model.named_modules()]`"
        )
    return targets


def target_weight(model: torch.nn.Module, target: Target) -> torch.Tensor:
    """The (out, in) weight of a target, a view, whatever its storage layout."""
    weight = model.get_submodule(target.name).weight
    return weight.T if target.transposed else weight
