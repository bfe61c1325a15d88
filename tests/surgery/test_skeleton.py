"""The decomposition stage's base model: every tensor but the targets' weights, read from
the checkpoint, the targets left unallocated until each is decomposed."""

import pytest
import torch
from safetensors.torch import save_file

from lqlora_dagster.models.kinds import model_kind
from lqlora_dagster.models.skeleton import base_without_targets
from lqlora_dagster.models.targets import find_targets
from tests.tiny_models import tiny_bert, tiny_gpt2, tiny_llama

ARCHS = {"llama": (tiny_llama, "causal-lm"), "gpt2": (tiny_gpt2, "causal-lm"), "bert": (tiny_bert, "seq-cls")}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_everything_but_the_targets_is_loaded(tmp_path, arch):
    build, task = ARCHS[arch]
    model = build()
    model.save_pretrained(tmp_path)
    targets = find_targets(model)
    base = base_without_targets(tmp_path, model_kind(task), targets)
    assert base is not None
    weights = {f"{t.name}.weight" for t in targets}
    full = dict(model.named_parameters())
    for name, p in base.named_parameters():
        assert p.is_meta == (name in weights), name
        if not p.is_meta:
            assert torch.equal(p, full[name]), name
    assert [t.name for t in find_targets(base)] == [t.name for t in targets]


def test_checkpoint_with_other_names_falls_back_to_a_whole_load(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    save_file({f"renamed.{k}": v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              tmp_path / "model.safetensors")
    assert base_without_targets(tmp_path, model_kind("causal-lm"), find_targets(model)) is None
