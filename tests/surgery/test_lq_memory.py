"""A compressed model costs its packed size, not the dense model's, to load and run.

Each model is loaded and run in a fresh interpreter (a process's freed memory is not
always returned, so two measurements in one process would flatter the second), on a
model big enough (54 MB of fp32 target weights) that the difference is not noise."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lqlora_dagster.models.targets import find_targets
from lqlora_dagster.quant.config import QLORA_NF3
from lqlora_dagster.quant.matrix import QuantizedMatrix
from lqlora_dagster.surgery.injector import LayerInit, replace_with_lq
from lqlora_dagster.surgery.lq_model_io import save_lq_model
from tests.tiny_models import tiny_llama

REPO = Path(__file__).resolve().parents[2]
MEASURE = """
import json, sys, torch
from pathlib import Path
from lqlora_dagster.memory import PeakMemory
from lqlora_dagster.quant import fast_decode
from lqlora_dagster.surgery.lq_model_io import load_lq_model
from transformers import AutoConfig, AutoModelForCausalLM
from accelerate import init_empty_weights
kind, folder = sys.argv[1], Path(sys.argv[2])
fast_decode.kernel()
with init_empty_weights():
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))  # import the architecture first
with PeakMemory() as memory, torch.no_grad():
    net = AutoModelForCausalLM.from_pretrained(folder) if kind == "fp32" else load_lq_model(folder)
    net(torch.arange(64)[None] % 512)
    net(torch.arange(4)[None])
print(json.dumps({"added_mb": memory.added_mb}))
"""


def mid_llama():
    return tiny_llama(hidden_size=512, num_hidden_layers=4, intermediate_size=1536, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=512)


def added_mb(kind: str, folder: Path) -> float:
    done = subprocess.run([sys.executable, "-c", MEASURE, kind, str(folder)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["added_mb"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    model = mid_llama()
    model.save_pretrained(root / "fp32")
    targets = find_targets(model)
    inits = {}
    for t in targets:
        W = model.get_submodule(t.name).weight.detach()
        inits[t.name] = LayerInit(QuantizedMatrix.quantize(W, QLORA_NF3), torch.zeros(t.rows, 8), torch.zeros(8, t.cols))
    replace_with_lq(model, inits)
    save_lq_model(model, root / "lq")
    return root


def test_compressed_model_adds_under_half_the_fp32_memory(saved):
    fp32, lq = added_mb("fp32", saved / "fp32"), added_mb("lq", saved / "lq")
    assert fp32 > 40, fp32  # the dense target weights alone are 54 MB
    assert lq < 0.5 * fp32, (lq, fp32)
