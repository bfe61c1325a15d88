"""`exported_model` on a finetuned tiny Llama: a GGUF that llama.cpp loads, generates from
and scores as our evaluation scores the same file; merged weights that plain
transformers reloads (in a process that never imports lqlora_dagster) with the in-tool
logits; a PEFT export that reproduces them; and what is refused before any work."""

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch

from lqlora_dagster.cli import main
from lqlora_dagster.definitions import build_definitions, resources_at
from lqlora_dagster.export import llama_runtime
from lqlora_dagster.export.ggml_types import ggml_type
from lqlora_dagster.generate import generate as generate_text
from lqlora_dagster.pipeline.context import StageContext
from lqlora_dagster.pipeline.finetuning import load_finetuned
from lqlora_dagster.sampling import Sampling
from lqlora_dagster.store.warehouse import Warehouse
from tests.conftest import registered_home
from tests.pipeline.conftest import MAIN_GRAPH, tiny_run_config
from tests.tiny_models import save_tiny_llama, tiny_llama, tiny_tokenizer, tokens

MODEL = "tiny-llama"
CHECK = {"check_len": 64, "check_windows": 4}


def materialize(home: Path, instance, selection, run_config: dict) -> dg.ExecuteInProcessResult:
    defs = build_definitions(home)
    return dg.materialize(
        list(defs.assets) + list(defs.asset_checks or []), instance=instance, partition_key=MODEL,
        resources=resources_at(home), run_config=run_config, selection=selection, raise_on_error=True,
    )


# a few merges, as any trained BPE vocabulary has (llama.cpp loads none without)
MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n"))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A home where the main graph ran on the tiny Llama (lqlora-fisher @ 3.0, 3 steps)."""
    home = tmp_path_factory.mktemp("home")
    folder = save_tiny_llama(tmp_path_factory.mktemp("tiny-bpe"), tokenizer=tiny_tokenizer(MERGES))
    with registered_home(home, {MODEL: folder}) as (_, instance):
        assert materialize(home, instance, MAIN_GRAPH, tiny_run_config()).success
        yield home, instance


def export(finetuned, **config) -> tuple[dict, dg.ExecuteInProcessResult]:
    home, instance = finetuned
    result = materialize(home, instance, dg.AssetSelection.assets("exported_model"),
                         {"ops": {"exported_model": {"config": {**CHECK, **config}}}})
    handle = result.output_for_node("exported_model")
    return handle, result


def in_tool_logits(home: Path, ids: torch.Tensor) -> torch.Tensor:
    from assets.runs import stored_handle

    ctx = StageContext.at(home)
    base = stored_handle(home, "base_model", MODEL)
    ref = stored_handle(home, "finetuned_adapters", MODEL).items[0]
    with torch.no_grad():
        return load_finetuned(ctx, base, ref).eval()(input_ids=ids).logits


def test_gguf_runs_in_llama_cpp_and_scores_as_our_evaluation_of_the_file(finetuned):
    handle, result = export(finetuned, format="gguf", bits=5.0)
    home = finetuned[0]
    w = Warehouse(home / "lqlora.duckdb")
    row = w.query("SELECT * FROM exports WHERE export_key = ?", [handle.export_key]).iloc[0]
    tensors = w.query("SELECT * FROM export_tensors WHERE export_key = ?", [handle.export_key])
    targets = tensors[tensors["is_target"]]
    assert row["format"] == "gguf" and row["target_bits"] <= 5.0 + 1e-9
    assert len(targets) == 14  # 7 matrices x 2 layers
    assert set(targets["type"]) <= {"Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL"}  # rows of 64: blocks of 32
    assert (targets["nbytes"] * 8).sum() / targets["numel"].sum() == pytest.approx(row["target_bits"])
    assert Path(handle.path).stat().st_size == row["file_bytes"]
    assert json.loads(row["sha256"])  # every file's checksum
    assert "unknown BPE pre-tokenizer" in row["notes"]  # the tiny vocabulary is no model llama.cpp knows
    scored = w.query("SELECT runtime, value FROM evaluations WHERE export_key = ?", [handle.export_key])
    by_runtime = dict(zip(scored["runtime"], scored["value"]))
    assert set(by_runtime) == {"llama.cpp", "transformers"}
    assert by_runtime["llama.cpp"] == pytest.approx(by_runtime["transformers"], rel=0.01)
    assert handle.exported_ppl == by_runtime["llama.cpp"] and handle.in_tool_ppl > 0
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert "export_close_to_in_tool" in checks
    made = list(llama_runtime.stream(Path(handle.path), [1, 40, 41, 42], 5, Sampling()))
    assert len(made) == 5 and all(0 <= t < 49152 for t, _ in made)
    again = list(llama_runtime.stream(Path(handle.path), [1, 40, 41, 42], 5, Sampling()))
    assert again == made  # greedy is deterministic


def test_a_wider_budget_buys_wider_types(finetuned):
    narrow, _ = export(finetuned, format="gguf", bits=4.5, check=False)
    wide, _ = export(finetuned, format="gguf", bits=8.5, check=False)
    w = Warehouse(finetuned[0] / "lqlora.duckdb")
    kinds = {h.export_key: set(w.query("SELECT type FROM export_tensors WHERE export_key = ? AND is_target",
                                       [h.export_key])["type"]) for h in (narrow, wide)}
    assert kinds[wide.export_key] == {"Q8_0"}
    assert all(ggml_type(t).bits_per_weight <= 5.0 for t in kinds[narrow.export_key])
    assert wide.file_bytes > narrow.file_bytes


PLAIN_TRANSFORMERS = """
import sys, numpy as np, torch
from transformers import AutoModelForCausalLM
assert not any(m.startswith("lqlora_dagster") for m in sys.modules)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor(np.load(sys.argv[2]))
with torch.no_grad():
    np.save(sys.argv[3], model(input_ids=ids).logits.numpy())
assert not any(m.startswith("lqlora_dagster") for m in sys.modules)
"""


def test_merged_weights_reload_in_plain_transformers_with_the_in_tool_logits(finetuned, tmp_path):
    handle, _ = export(finetuned, format="hf", dtype="fp32")
    folder = Path(handle.path)
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    assert (folder / "tokenizer.json").is_file()
    ids = tokens(2, 16)
    np.save(tmp_path / "ids.npy", ids.numpy())
    subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(folder), str(tmp_path / "ids.npy"),
                    str(tmp_path / "logits.npy")], check=True, cwd=tmp_path)
    reloaded = torch.from_numpy(np.load(tmp_path / "logits.npy"))
    torch.testing.assert_close(reloaded, in_tool_logits(finetuned[0], ids), rtol=1e-4, atol=1e-4)
    assert handle.exported_ppl == pytest.approx(handle.in_tool_ppl, rel=1e-3)


def test_peft_export_reproduces_the_in_tool_logits(finetuned):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    handle, _ = export(finetuned, format="peft")
    folder = Path(handle.path)
    net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder / "base"), folder / "adapter").eval()
    ids = tokens(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(input_ids=ids).logits, in_tool_logits(finetuned[0], ids), rtol=1e-4,
                                   atol=1e-4)


def cli(home: Path, *argv: str, capsys) -> tuple[int, str]:
    code = main(["--home", str(home), "export", *argv])
    return code, capsys.readouterr().err


def test_bad_exports_are_refused_before_any_work(finetuned, tmp_path, capsys, monkeypatch):
    home = finetuned[0]
    out = str(tmp_path / "m.gguf")
    before = Warehouse(home / "lqlora.duckdb").query("SELECT count(*) AS n FROM exports")["n"][0]
    code, err = cli(home, out, "--model", MODEL, "--bits", "2.0", capsys=capsys)
    assert code == 2 and "--bits 2 is below what the smallest allowed types take" in err
    code, err = cli(home, out, "--model", MODEL, "--types", "Q4_K", "Q6_K", capsys=capsys)
    assert code == 2 and "none of the types Q4_K, Q6_K fits" in err
    code, err = cli(home, out, "--model", MODEL, "--method", "qlora", capsys=capsys)
    assert code == 2 and "no finetuned adapter for qlora" in err and "lqlora-fisher @ 3" in err
    code, err = cli(home, str(tmp_path / "m.bin"), "--model", MODEL, capsys=capsys)
    assert code == 2 and "name it *.gguf" in err
    code, err = cli(home, out, "--model", "never-run", capsys=capsys)
    assert code == 2 and "has no finetuned adapters yet" in err
    with pytest.raises(SystemExit) as stopped:
        main(["--home", str(home), "export", out, "--format", "onnx"])
    assert stopped.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err
    monkeypatch.setattr("lqlora_dagster.pipeline.exporting.json_config",
                        lambda model: {"architectures": ["NotAModelForCausalLM"]})
    code, err = cli(home, out, "--model", MODEL, capsys=capsys)
    assert code == 2 and "converter does not know the architecture NotAModelForCausalLM" in err
    assert Warehouse(home / "lqlora.duckdb").query("SELECT count(*) AS n FROM exports")["n"][0] == before
    assert not Path(out).exists()


def generate(home: Path, capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["--home", str(home), "generate", "the tiny", "--model", MODEL, "--max-new-tokens", "6", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_runs_the_gguf_export_in_llama_cpp_and_samples_repeatably(finetuned, capsys):
    home = finetuned[0]
    export(finetuned, format="gguf", bits=5.0)
    code, text, err = generate(home, capsys, "--engine", "llama.cpp")
    assert code == 0 and "llama.cpp" in err and "tokens/s" in err and text.strip()
    path = Path(export(finetuned, format="gguf", bits=5.0)[0].path)
    drawn = [[t for t, _ in llama_runtime.stream(path, [1, 40, 41], 8, Sampling(1.0, 0.9, seed))]
             for seed in (7, 7, 8)]
    assert drawn[0] == drawn[1] != drawn[2]
    assert generate(home, capsys, "--engine", "llama.cpp", "--temperature", "1.0", "--seed", "7")[0] == 0
    code, _, err = generate(home, capsys, "--top-p", "0")
    assert code == 2 and "--top-p must lie in (0, 1]" in err
    code, _, err = generate(home, capsys, "--engine", "llama.cpp", "--method", "reference")
    assert code == 2 and ("no GGUF export" in err or "no finetuned adapter for reference" in err)


def test_sampling_in_lqlora_repeats_with_its_seed_and_greedy_ignores_it():
    tokenizer = tiny_tokenizer()
    net = tiny_llama(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id)
    ids = tokenizer("the tiny", return_tensors="pt")["input_ids"]
    text = {seed: generate_text(net, tokenizer, ids, 12, sampling=Sampling(1.0, 0.95, seed)).text for seed in (1, 2)}
    assert generate_text(net, tokenizer, ids, 12, sampling=Sampling(1.0, 0.95, 1)).text == text[1] != text[2]
    greedy = [generate_text(net, tokenizer, ids, 12, sampling=Sampling(0.0, 1.0, s)).text for s in (1, 2)]
    assert greedy[0] == greedy[1]
