"""Save/load of LQ models, PEFT adapters over the dequantized base, merged exports."""

import copy

import pytest
import torch

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.export.folders import write_merged
from lqlora_dagster.surgery.decompose_model import apply_decompositions
from lqlora_dagster.surgery.injector import lq_layers, to_dense
from lqlora_dagster.surgery.lq_model_io import load_lq_model, save_lq_model
from lqlora_dagster.surgery.peft_adapter import dequantized_base, export_peft_adapter
from tests.surgery.test_lq_layers import lq_model
from tests.tiny_models import tiny_bert, tiny_gpt2, tiny_llama, tokens

BUILDERS = {
    "llama": (tiny_llama, "causal-lm"),
    "bert": (tiny_bert, "seq-cls"),
    "gpt2": (tiny_gpt2, "causal-lm"),
}


def trained_lq(build, method="lqlora"):
    model, _, decs = lq_model(build, method)
    apply_decompositions(model, decs)
    with torch.no_grad():  # pretend finetuning moved the factors
        for layer in lq_layers(model).values():
            layer.L1.add_(0.01 * torch.randn_like(layer.L1))
            layer.L2.add_(0.01 * torch.randn_like(layer.L2))
    return model


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_save_load_same_logits(tmp_path, arch):
    build, task = BUILDERS[arch]
    model = trained_lq(build)
    save_lq_model(model, tmp_path / "m", task=task)
    assert not list((tmp_path / "m").glob("*.bin")) and not list((tmp_path / "m").glob("*.pt"))
    loaded = load_lq_model(tmp_path / "m")
    x = tokens(2, 16)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    # same tensors; only memory layout may differ, which can move the last float bit
    assert torch.allclose(logits(model, x), logits(loaded, x), atol=1e-6, rtol=0)
    assert {n: m.config for n, m in lq_layers(loaded).items()} == {
        n: m.config for n, m in lq_layers(model).items()
    }


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_round_trip_same_logits(tmp_path, arch):
    from peft import PeftModel

    build, task = BUILDERS[arch]
    model = trained_lq(build)
    export_peft_adapter(model, tmp_path / "adapter", task=task)
    peft_model = PeftModel.from_pretrained(dequantized_base(model), tmp_path / "adapter").eval()
    x = tokens(2, 16)
    assert torch.allclose(logits(peft_model, x), logits(model, x), atol=1e-5, rtol=1e-4)


def test_peft_round_trip_with_classifier_head(tmp_path):
    from peft import PeftModel

    model = trained_lq(tiny_bert)
    with torch.no_grad():
        model.classifier.weight.mul_(3.0)
    export_peft_adapter(model, tmp_path / "adapter", task="seq-cls", head="classifier")
    base = dequantized_base(model)
    with torch.no_grad():
        base.classifier.weight.zero_()  # the adapter must carry the trained head
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    x = tokens(2, 16)
    assert torch.allclose(logits(peft_model, x), logits(model, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_merged_export_loads_in_plain_transformers(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    build, task = BUILDERS[arch]
    model = trained_lq(build)
    write_merged(to_dense(copy.deepcopy(model), merge=True), None, tmp_path / "merged")
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    plain = auto.from_pretrained(tmp_path / "merged").eval()
    x = tokens(2, 16)
    assert torch.allclose(logits(plain, x), logits(model, x), atol=1e-5, rtol=1e-4)


def test_saving_a_plain_model_is_refused(tmp_path):
    with pytest.raises(LQLoRAInputError, match="no LQLinear layers"):
        save_lq_model(tiny_llama(), tmp_path / "x")


def test_loading_a_non_lq_folder_is_refused(tmp_path):
    with pytest.raises(LQLoRAInputError, match="is not a saved LQ model"):
        load_lq_model(tmp_path)
