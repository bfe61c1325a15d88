"""`lqlora register` on every kind of source (a .gguf file, a hub id in the local HF
cache, folders of architectures outside the usual few) and its refusals, which must
leave DuckDB as it was. Every model is a tiny one built here."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lqlora_dagster import cli
from lqlora_dagster.models.source import resolve_model_folder
from lqlora_dagster.pipeline.registry import registered_models
from lqlora_dagster.store.warehouse import Warehouse
from tests.tiny_models import TINY_SHAPE, gguf_tensors, tiny_llama_config, write_gguf


def register(home: Path, *argv: str, capsys) -> tuple[int, str, str]:
    code = cli.main(["--home", str(home), "register", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def models_table(home: Path) -> list[dict]:
    return registered_models(Warehouse(home / "lqlora.duckdb")).to_dict("records")


def save_causal_lm(folder: Path, config) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    """A 2-layer Llama as an fp32 GGUF (llama.cpp tensor names) with a byte-level BPE
    vocabulary; returns the tensors written."""
    tensors = gguf_tensors()
    write_gguf(path, tensors)
    return tensors


@pytest.fixture()
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture()
def llama_folder(tmp_path) -> Path:
    return save_causal_lm(tmp_path / "llama", tiny_llama_config())


def test_gguf_file_registers_and_dequantizes_once(home, tmp_path, capsys):
    pytest.importorskip("gguf")
    path = tmp_path / "Tiny-Llama.F32.gguf"
    tensors = write_tiny_gguf(path)
    code, out, err = register(home, str(path), capsys=capsys)
    assert code == 0, err
    assert "LlamaForCausalLM: 14 target matrices in 7 kinds" in out
    assert re.search(r"k_proj +2 +32 x 64\n", out) and re.search(r"down_proj +2 +64 x 128\n", out)
    assert "target parameters: 73,728" in out  # 2 layers * (2*64*64 + 2*32*64 + 3*64*128)
    assert "registered 'tiny-llama.f32'" in out
    [row] = models_table(home)
    assert row["source"] == str(path.resolve()) and row["task"] == "causal-lm"
    assert not (home / "models").exists()  # registration read the metadata only

    folder, task = resolve_model_folder(row["source"], home / "models")
    assert (
        task == "causal-lm" and folder.parent == home / "models" and folder.name.startswith("tiny-llama.f32-")
    )
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(
        model.model.layers[1].mlp.down_proj.weight, torch.from_numpy(tensors["blk.1.ffn_down.weight"])
    )
    written = folder.stat().st_mtime_ns
    assert (
        resolve_model_folder(row["source"], home / "models")[0] == folder
        and folder.stat().st_mtime_ns == written
    )

    # a changed file gets its own copy, never the stale one
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert resolve_model_folder(row["source"], home / "models")[0] != folder


def make_hub_cache(root: Path, config) -> Path:
    """models--org--tiny with an older snapshot and the one refs/main points to."""
    repo = root / "models--org--tiny"
    save_causal_lm(repo / "snapshots" / "old", config)
    snapshot = save_causal_lm(repo / "snapshots" / "abc", config)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    os.utime(repo / "snapshots" / "old", ns=(2 * 10**18, 2 * 10**18))  # newest by mtime, but not main
    return snapshot


@pytest.mark.parametrize("given", ["org/tiny", "hub:org/tiny"])
def test_hub_id_from_the_local_cache(home, tmp_path, monkeypatch, capsys, given):
    snapshot = make_hub_cache(tmp_path / "hf", tiny_llama_config())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    code, out, err = register(home, given, capsys=capsys)
    assert code == 0, err
    assert "LlamaForCausalLM: 14 target matrices" in out and "registered 'tiny' from hub:org/tiny@abc" in out
    [row] = models_table(home)
    assert row["source"] == "hub:org/tiny@abc"  # pinned to the commit refs/main named at registration
    (tmp_path / "hf" / "models--org--tiny" / "refs" / "main").write_text("old")  # a later download moves main
    assert resolve_model_folder(row["source"], home / "models") == (snapshot, "causal-lm")


def test_hub_revision_names_a_cached_commit(home, tmp_path, monkeypatch, capsys):
    make_hub_cache(tmp_path / "hf", tiny_llama_config())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)
    code, out, err = register(home, "hub:org/tiny@old", capsys=capsys)
    assert code == 0, err
    assert models_table(home)[0]["source"] == "hub:org/tiny@old"
    code, _, err = register(home, "hub:org/tiny@f00d", "--name", "other", capsys=capsys)
    assert code == 2 and "revision 'f00d' of hub model 'org/tiny' is not in the local Hugging Face cache" in err
    assert "holds ['abc', 'old']" in err


def test_missing_hub_id_names_the_cache_searched(home, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    code, _, err = register(home, "org/absent", capsys=capsys)
    assert code == 2
    assert f"searched {tmp_path / 'empty-cache' / 'models--org--absent' / 'snapshots'}" in err
    assert "huggingface-cli download org/absent" in err and "Traceback" not in err
    assert not (home / "lqlora.duckdb").exists()


def _qwen2():
    from transformers import Qwen2Config

    return Qwen2Config(num_key_value_heads=2, **TINY_SHAPE), "Qwen2ForCausalLM", 14, "q_proj"


def _gpt_neox():
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(**TINY_SHAPE), "GPTNeoXForCausalLM", 8, r"query_key_value +2 +192 x 64"


def _phi():
    from transformers import PhiConfig

    return PhiConfig(**TINY_SHAPE), "PhiForCausalLM", 12, "fc1"


def _gemma3():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(num_key_value_heads=2, head_dim=16, **TINY_SHAPE), "Gemma3ForCausalLM", 14, "gate_proj"


@pytest.mark.parametrize("make", [_qwen2, _gpt_neox, _phi, _gemma3], ids=lambda f: f.__name__[1:])
def test_other_architectures_register_with_default_targets(home, tmp_path, capsys, make):
    config, architecture, count, line = make()
    folder = save_causal_lm(tmp_path / "m", config)
    code, out, err = register(home, str(folder), "--name", "other", capsys=capsys)
    assert code == 0, err
    assert f"{architecture}: {count} target matrices" in out and re.search(line, out)
    assert models_table(home)[0]["model"] == "other"


def test_pickle_only_folder_is_refused(home, tmp_path, llama_folder, capsys):
    assert register(home, str(llama_folder), "--name", "ok", capsys=capsys)[0] == 0
    before = models_table(home)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((llama_folder / "config.json").read_text())
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    code, _, err = register(home, str(pickled), capsys=capsys)
    assert code == 2
    assert "only pickle weights (pytorch_model.bin)" in err and "lqlora never loads pickles" in err
    assert "save_pretrained" in err and "safe_serialization=True" in err
    assert models_table(home) == before


@pytest.mark.parametrize(
    "pattern, message",
    [
        (r"attention\.query$", "matches no module of this LlamaForCausalLM"),
        (r"input_layernorm$", "cannot be wrapped"),
    ],
)
def test_no_targets_is_refused_before_duckdb(home, llama_folder, capsys, pattern, message):
    code, _, err = register(home, str(llama_folder), "--pattern", pattern, capsys=capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (home / "lqlora.duckdb").exists()


def test_broken_configs_are_refused(home, tmp_path, llama_folder, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in llama_folder.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text("{ not json")
    code, _, err = register(home, str(broken), capsys=capsys)
    assert code == 2 and "config.json is not valid JSON" in err

    config = json.loads((llama_folder / "config.json").read_text())
    (broken / "config.json").write_text(
        json.dumps({**config, "model_type": "alien-net", "architectures": ["Alien"]})
    )
    code, _, err = register(home, str(broken), capsys=capsys)
    assert (
        code == 2
        and "names model_type 'alien-net', which transformers" in err
        and "upgrade transformers" in err
    )
    assert not (home / "lqlora.duckdb").exists()
