"""LQLinear forward/backward, injection by regex across architectures."""

import pytest
import torch

from lqlora_dagster.decompose.lq import LQSettings
from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.methods import get_method
from lqlora_dagster.models.targets import find_targets, target_weight
from lqlora_dagster.quant import QLORA_NF4, QuantConfig
from lqlora_dagster.surgery.decompose_model import apply_decompositions, decompose_targets
from lqlora_dagster.surgery.injector import lq_layers, mark_trainable
from tests.tiny_models import TINY_SHAPE, tiny_bert, tiny_gpt2, tiny_llama, tokens

SETTINGS = LQSettings(rank=4)


def lq_model(build, method="lqlora", config=QLORA_NF4):
    model = build()
    targets = find_targets(model)
    decs = decompose_targets(model, targets, {t.name: config for t in targets}, get_method(method), SETTINGS)
    return model, targets, decs


@pytest.mark.parametrize("build,n_targets", [(tiny_llama, 14), (tiny_bert, 12), (tiny_gpt2, 8)])
def test_forward_equals_dense_reconstruction(build, n_targets):
    model, targets, decs = lq_model(build)
    assert len(targets) == n_targets
    reference = build()  # same seed, same weights: overwrite targets with deq(Q) + L1 L2
    with torch.no_grad():
        for t in targets:
            W = decs[t.name].reconstruct()
            target_weight(reference, t).copy_(W)
    apply_decompositions(model, decs)
    assert len(lq_layers(model)) == n_targets
    x = tokens(2, 16)
    with torch.no_grad():
        ours, ref = model(input_ids=x).logits, reference(input_ids=x).logits
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)


def test_gradients_reach_only_the_factors():
    model, _, decs = lq_model(tiny_llama)
    apply_decompositions(model, decs)
    trainable = mark_trainable(model)
    assert trainable and all(n.endswith((".L1", ".L2")) for n in trainable)
    x = tokens(2, 16)
    model(input_ids=x, labels=x).loss.backward()
    for name, p in model.named_parameters():
        if name.endswith((".L1", ".L2")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    for layer in lq_layers(model).values():  # packed Q never gets a gradient
        assert all(not b.requires_grad for b in layer.buffers())


def test_input_gradient_through_frozen_q_is_exact():
    model, targets, decs = lq_model(tiny_llama)
    layer_name = targets[0].name
    apply_decompositions(model, decs)
    layer = model.get_submodule(layer_name)
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    dense = layer.merged_weight()
    assert torch.allclose(x.grad, torch.ones(3, layer.out_features) @ dense, atol=1e-5)


def test_classifier_head_can_train():
    model, _, decs = lq_model(tiny_bert)
    apply_decompositions(model, decs)
    trainable = mark_trainable(model, head="classifier")
    assert "classifier.weight" in trainable


def test_mixed_configs_per_layer():
    model = tiny_llama()
    targets = find_targets(model)
    configs = [QLORA_NF4, QuantConfig(2, 3, "bf16", 16, 16), QuantConfig(8, 8, "fp16", 32, 64)]
    plan = {t.name: configs[i % 3] for i, t in enumerate(targets)}
    decs = decompose_targets(model, targets, plan, get_method("lqlora"), SETTINGS)
    apply_decompositions(model, decs)
    assert {m.config for m in lq_layers(model).values()} == set(configs)


@pytest.mark.parametrize(
    "pattern,message",
    [
        (r"\.nothing_here$", "matches no module"),
        (r"embed_tokens$", "is a Embedding, which cannot be wrapped"),
        (r"(", "not a valid regex"),
    ],
)
def test_bad_target_patterns(pattern, message):
    with pytest.raises(LQLoRAInputError, match=message):
        find_targets(tiny_llama(), pattern)


def test_any_architecture_gets_all_linear_layers_of_its_blocks():
    """Gemma-3 (no entry in any table) gets every projection of its blocks, never the
    LM head or the embeddings; an explicit pattern still narrows the choice."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(**TINY_SHAPE, num_key_value_heads=2, head_dim=16)
    model = Gemma3ForCausalLM(cfg)
    targets = find_targets(model)
    assert len(targets) == 14 and {t.layer for t in targets} == {0, 1}
    assert {t.kind for t in targets} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(t.name.startswith("model.layers.") for t in targets)  # no lm_head, no embeddings
    assert len(find_targets(model, r"mlp\.down_proj$")) == 2


def test_a_model_without_repeated_blocks_needs_a_pattern():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(LQLoRAInputError, match="finds no module of this Sequential; pass --pattern"):
        find_targets(model)
    assert [t.name for t in find_targets(model, r"^0$")] == ["0"]


def test_plan_must_cover_every_target():
    model = tiny_llama()
    targets = find_targets(model)
    with pytest.raises(LQLoRAInputError, match="assigns no config to 1 targets"):
        decompose_targets(
            model, targets, {t.name: QLORA_NF4 for t in targets[1:]}, get_method("lqlora"), SETTINGS
        )


def test_fisher_method_needs_fisher():
    model = tiny_llama()
    targets = find_targets(model)
    with pytest.raises(LQLoRAInputError, match="needs Fisher diagonals"):
        decompose_targets(
            model, targets, {t.name: QLORA_NF4 for t in targets}, get_method("lqlora-fisher"), SETTINGS
        )
