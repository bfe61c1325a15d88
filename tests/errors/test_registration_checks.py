"""`lqlora register` reads every tensor of a checkpoint before it stores anything.

Each case is a tiny model built here and broken in one way a real download or export
breaks (a file cut short, a vocabulary-only GGUF, a NaN in an embedding, a tensor left
out or of the wrong shape); each goes through the real CLI and must end in exit code 2,
one message naming the file, the tensor and what to do, no traceback, and nothing
stored: no row in DuckDB's `models`, no Dagster partition, no converted copy.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lqlora_dagster import cli
from lqlora_dagster.models.checkpoint_checks import finite_problems
from lqlora_dagster.models.checkpoint_files import Problem, safetensors_entries, safetensors_slices
from tests.tiny_models import gguf_tensors, write_gguf


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))  # where the CLI puts it; restored after
    return home


def register(home: Path, source: Path, capsys) -> tuple[int, str]:
    code = cli.main(["--home", str(home), "register", str(source)])
    return code, capsys.readouterr().err


def stored(home: Path) -> tuple[list[str], list[str]]:
    """(models in DuckDB's registry, base_models partitions in Dagster) under `home`."""
    models: list[str] = []
    partitions: list[str] = []
    if (home / "lqlora.duckdb").exists():
        from lqlora_dagster.pipeline.registry import registered_models
        from lqlora_dagster.store.warehouse import Warehouse

        models = sorted(registered_models(Warehouse(home / "lqlora.duckdb"))["model"])
    if (home / "dagster").exists():
        import dagster as dg

        with dg.instance_for_test(temp_dir=str(home / "dagster")) as instance:
            partitions = sorted(instance.get_dynamic_partitions("base_models"))
    return models, partitions


def assert_refused(home: Path, code: int, err: str, *messages: str) -> None:
    """Exit code 2, each message on stderr, no traceback, and nothing stored anywhere."""
    assert code == 2, err
    assert "Traceback" not in err, err
    for message in messages:
        assert re.search(message, err), f"{message!r} not in {err!r}"
    assert stored(home) == ([], [])
    assert not (home / "models").exists()  # no GGUF was converted either


# --- tiny checkpoints ----------------------------------------------------------------------


def save_llama(folder: Path) -> Path:
    from tests.tiny_models import tiny_llama

    tiny_llama().save_pretrained(folder)
    return folder


def rewrite_weights(folder: Path, edit) -> Path:
    """Apply `edit` to the folder's state dict and save it back as safetensors."""
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})
    return path


# --- the cases -------------------------------------------------------------------------------


def test_a_well_formed_gguf_and_folder_still_register(home, tmp_path, capsys):
    """The control: the builders below make checkpoints that register when left whole."""
    code = cli.main(["--home", str(home), "register", str(write_gguf(tmp_path / "ok.gguf", gguf_tensors()))])
    assert code == 0, capsys.readouterr().err
    code = cli.main(["--home", str(home), "register", str(save_llama(tmp_path / "llama"))])
    assert code == 0, capsys.readouterr().err
    assert stored(home) == (["llama", "ok"], ["llama", "ok"])  # what `assert_refused` finds empty


def test_gguf_with_no_tensors(home, tmp_path, capsys):
    path = write_gguf(tmp_path / "vocab-only.gguf", {})
    code, err = register(home, path, capsys)
    assert_refused(home, code, err, re.escape(str(path)), "holds no tensors", "vocabulary-only", "full GGUF")


def test_safetensors_file_cut_in_half(home, tmp_path, capsys):
    folder = save_llama(tmp_path / "cut")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, err = register(home, folder, capsys)
    assert_refused(
        home, code, err, re.escape(str(path)), r"is truncated", r"header describes \d+ bytes", "copy it again"
    )


NON_FINITE = {
    "nan in the embedding": ("model.embed_tokens.weight", (5, 7), float("nan"), "1 NaN and 0 Inf"),
    "inf in the embedding": ("model.embed_tokens.weight", (0, 0), float("-inf"), "0 NaN and 1 Inf"),
    "nan in a norm weight": ("model.layers.1.input_layernorm.weight", (3,), float("nan"), "1 NaN and 0 Inf"),
    "inf in a norm weight": ("model.norm.weight", (63,), float("inf"), "0 NaN and 1 Inf"),
    "nan in a target weight": ("model.layers.0.mlp.up_proj.weight", (1, 2), float("nan"), "1 NaN and 0 Inf"),
}


@pytest.mark.parametrize("case", sorted(NON_FINITE))
def test_non_finite_values_anywhere(home, tmp_path, capsys, case):
    name, index, value, counts = NON_FINITE[case]

    def poison(state):
        state[name][index] = value

    path = rewrite_weights(save_llama(tmp_path / "poisoned"), poison)
    code, err = register(home, path.parent, capsys)
    assert_refused(home, code, err, re.escape(f"{path}: tensor {name} has {counts} values"), "corrupt")


def test_nan_in_a_gguf_norm(home, tmp_path, capsys):
    tensors = gguf_tensors()
    tensors["blk.1.ffn_norm.weight"][10] = np.nan
    path = write_gguf(tmp_path / "nan.gguf", tensors)
    code, err = register(home, path, capsys)
    assert_refused(home, code, err, re.escape(f"{path}: tensor blk.1.ffn_norm.weight has 1 NaN and 0 Inf"))


def test_gguf_of_100_bytes(home, tmp_path, capsys):
    whole = write_gguf(tmp_path / "whole.gguf", gguf_tensors()).read_bytes()
    path = tmp_path / "short.gguf"
    path.write_bytes(whole[:100])
    code, err = register(home, path, capsys)
    assert_refused(home, code, err, re.escape(str(path)), "ends at byte 100", "download or copy it again")


def test_truncated_gguf(home, tmp_path, capsys):
    path = write_gguf(tmp_path / "truncated.gguf", gguf_tensors())
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 20_000])
    code, err = register(home, path, capsys)
    assert_refused(
        home,
        code,
        err,
        re.escape(str(path)),
        r"tensor blk\.\d\.\w+\.weight",
        "lies beyond the end",
        "truncated",
    )


def test_tensor_missing_from_the_checkpoint(home, tmp_path, capsys):
    name = "model.layers.1.mlp.down_proj.weight"
    path = rewrite_weights(save_llama(tmp_path / "missing"), lambda state: state.pop(name))
    code, err = register(home, path.parent, capsys)
    assert_refused(
        home, code, err, re.escape(f"{path.parent}: tensor {name} (64 x 128) is missing"), "LlamaForCausalLM"
    )


def test_tensor_missing_from_a_gguf(home, tmp_path, capsys):
    tensors = gguf_tensors()
    del tensors["blk.0.ffn_up.weight"]
    path = write_gguf(tmp_path / "missing.gguf", tensors)
    code, err = register(home, path, capsys)
    assert_refused(
        home, code, err, re.escape(f"{path}: tensor model.layers.0.mlp.up_proj.weight"), "is missing"
    )


def test_tensor_with_the_wrong_shape(home, tmp_path, capsys):
    name = "model.layers.0.self_attn.k_proj.weight"

    def shrink(state):
        state[name] = state[name][:16].contiguous()

    path = rewrite_weights(save_llama(tmp_path / "shape"), shrink)
    code, err = register(home, path.parent, capsys)
    assert_refused(
        home,
        code,
        err,
        re.escape(f"{path}: tensor {name} has shape 16 x 64, but LlamaForCausalLM"),
        "32 x 64",
    )


def test_tensor_with_the_wrong_dtype(home, tmp_path, capsys):
    name = "model.layers.1.self_attn.o_proj.weight"

    def to_int8(state):
        state[name] = state[name].to(torch.int8)

    path = rewrite_weights(save_llama(tmp_path / "dtype"), to_int8)
    code, err = register(home, path.parent, capsys)
    assert_refused(home, code, err, re.escape(f"{path}: tensor {name} is stored as I8"), "floating")


def test_sharded_index_naming_a_missing_file(home, tmp_path, capsys):
    folder = save_llama(tmp_path / "sharded")
    keys = load_file(folder / "model.safetensors").keys()
    index = {"metadata": {}, "weight_map": {k: "model-00002-of-00002.safetensors" for k in keys}}
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    code, err = register(home, folder, capsys)
    assert_refused(home, code, err, "model-00002-of-00002.safetensors", "does not exist")


def test_weights_under_a_name_transformers_does_not_load(home, tmp_path, capsys):
    folder = save_llama(tmp_path / "renamed")
    (folder / "model.safetensors").rename(folder / "weights.safetensors")
    code, err = register(home, folder, capsys)
    assert_refused(home, code, err, "holds weights.safetensors but neither model.safetensors", "rename")


def test_a_link_to_a_missing_weights_file(home, tmp_path, capsys):
    """A hub cache copied without its blobs: the snapshot's links point nowhere."""
    folder = save_llama(tmp_path / "snapshot")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(tmp_path / "blobs" / "0123abcd")
    code, err = register(home, folder, capsys)
    assert_refused(
        home, code, err, "model.safetensors is a link to .*0123abcd, which does not exist", "download"
    )


class Log:
    def __init__(self):
        self.warnings: list[str] = []

    def info(self, message: str) -> None:
        pass

    def warning(self, message: str) -> None:
        self.warnings.append(message)


def test_the_inbox_sensor_checks_a_dropped_folder_once(tmp_path):
    """The sensor refuses a poisoned folder as `register` does, and does not read a
    registered folder's weights again on every tick (seconds per GB, every 30 s)."""
    from assets.automation import register_inbox
    from resources import ModelSource, WarehouseResource

    inbox = tmp_path / "inbox"
    path = rewrite_weights(
        save_llama(inbox / "poisoned"), lambda s: s["model.norm.weight"].fill_(float("nan"))
    )
    save_llama(inbox / "tiny")
    models = ModelSource(cache_dir=str(tmp_path / "cache"), inbox_dir=str(inbox))
    warehouse = WarehouseResource(database=str(tmp_path / "lqlora.duckdb"))
    log = Log()
    assert register_inbox(models, warehouse, log) == ["tiny"]
    [warning] = log.warnings
    assert f"{path}: tensor model.norm.weight has 64 NaN and 0 Inf values" in warning
    cut = inbox / "tiny" / "model.safetensors"  # changed after registration: no longer read each tick
    cut.write_bytes(cut.read_bytes()[:1000])
    log.warnings.clear()
    assert register_inbox(models, warehouse, log) == []
    assert len(log.warnings) == 1 and "poisoned" in log.warnings[0]


def test_the_scan_holds_a_slice_of_a_large_tensor_and_counts_every_slice(tmp_path):
    """A tensor read in slices of 16 rows: a NaN in the last slice is still found, and
    counted once; memory stays at one slice, not the tensor."""
    weight = torch.zeros(100, 8)
    weight[99, 7] = float("nan")
    weight[3, 0] = float("inf")
    path = tmp_path / "big.safetensors"
    save_file({"w": weight, "b": torch.ones(8)}, path)
    entries = safetensors_entries(path)
    [problem] = finite_problems(entries, max_elements=16 * 8)
    assert problem == Problem(path, "w", "has 1 NaN and 1 Inf values (shape 100 x 8)", problem.fix)
    assert [tuple(s.shape) for s in safetensors_slices(entries[1], max_elements=16 * 8)] == [(16, 8)] * 6 + [
        (4, 8)
    ]
