"""Shared fixtures: tiny models built in code, and the real bundled SmolLM2 (cached)."""

import contextlib
import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    """Under pytest-xdist (`make test` runs one worker per core), each worker gets its share of
    the cores for torch, and so do the processes it starts (OMP_NUM_THREADS): two
    workers with two threads each on two cores spin against each other and run far
    slower than one. The controller converts the bundled models once beforehand, so no
    two workers write the same cache folder."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    elif getattr(config.option, "numprocesses", None):
        from lqlora_dagster.models.source import resolve_model_folder

        cache = Path(os.environ.get("LQLORA_HOME", REPO / ".lqlora")) / "models"
        for name in ("smollm2-135m", "minilm-l6"):
            resolve_model_folder(name, cache)


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """Where converted base models are cached across test runs (LQLORA_HOME/models)."""
    home = Path(os.environ.get("LQLORA_HOME", REPO / ".lqlora"))
    return home / "models"


@pytest.fixture(scope="session")
def smollm2_folder(model_cache: Path) -> Path:
    from lqlora_dagster.models.source import resolve_model_folder

    folder, _ = resolve_model_folder("smollm2-135m", model_cache)
    return folder


@pytest.fixture(scope="session")
def smollm2(smollm2_folder: Path):
    from lqlora_dagster.models.loading import load_model, load_tokenizer

    return load_model(smollm2_folder), load_tokenizer(smollm2_folder)


@pytest.fixture()
def gaussian() -> torch.Tensor:
    return torch.randn(96, 160, generator=torch.Generator().manual_seed(0)) * 0.02


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory, smollm2_folder: Path) -> Path:
    """A 2-layer Llama with SmolLM2's real tokenizer (so the real text pipeline runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (smollm2_folder / name).exists():
            shutil.copy(smollm2_folder / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_folder(tmp_path_factory) -> Path:
    """A 2-layer BERT encoder with MiniLM's real tokenizer (the real polarity text runs)."""
    from transformers import BertConfig, BertModel

    from lqlora_dagster.models.source import resolve_model_folder

    minilm, _ = resolve_model_folder("minilm-l6", Path(os.environ.get("LQLORA_HOME", REPO / ".lqlora")) / "models")
    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
        vocab_size=30522, max_position_embeddings=128,
    )
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm / name, folder / name)
    return folder


@contextlib.contextmanager
def registered_home(home: Path, models: dict[str, Path]):
    """LQLORA_HOME pointed at `home` with `models` registered and their partitions in a
    test Dagster instance; yields (warehouse, instance); restores LQLORA_HOME after."""
    import dagster as dg

    from lqlora_dagster.pipeline.registry import register_model
    from lqlora_dagster.store.warehouse import Warehouse

    old = os.environ.get("LQLORA_HOME")
    os.environ["LQLORA_HOME"] = str(home)
    try:
        warehouse = Warehouse(home / "lqlora.duckdb")
        warehouse.init_schema()
        for name, folder in models.items():
            register_model(warehouse, name, str(folder))
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions("base_models", list(models))
            yield warehouse, instance
    finally:
        if old is None:
            os.environ.pop("LQLORA_HOME", None)
        else:
            os.environ["LQLORA_HOME"] = old
