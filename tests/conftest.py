"""Shared fixtures: tiny models built in code (tests/tiny_models.py), and the real
bundled SmolLM2 and MiniLM (converted once, cached). The tier markers `make test-fast`
leaves out are put on each test by tests/tiers.py."""

import contextlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.tiers import mark_tiers, may_select

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    """Under pytest-xdist (`make test` runs one worker per core), each worker gets its share of
    the cores for torch, and so do the processes it starts (OMP_NUM_THREADS): two
    workers with two threads each on two cores spin against each other and run far
    slower than one. The controller converts the bundled models once beforehand, so no
    two workers write the same cache folder (unless `-m` leaves out the real-model tests)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    elif getattr(config.option, "numprocesses", None) and may_select(config, "real_model"):
        from lqlora_dagster.models.source import resolve_model_folder

        cache = Path(os.environ.get("LQLORA_HOME", REPO / ".lqlora")) / "models"
        for name in ("smollm2-135m", "minilm-l6"):
            resolve_model_folder(name, cache)


def pytest_collection_modifyitems(config, items) -> None:
    mark_tiers(items)


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


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory) -> Path:
    """The tiny Llama with the tiny byte-level tokenizer and chat template (tests/tiny_models.py),
    as a registered model's folder: the whole text pipeline runs, no real model needed."""
    from tests.tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def minilm_folder(model_cache: Path) -> Path:
    from lqlora_dagster.models.source import resolve_model_folder

    folder, _ = resolve_model_folder("minilm-l6", model_cache)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_folder(tmp_path_factory, minilm_folder: Path) -> Path:
    """A 2-layer BERT encoder with MiniLM's real tokenizer (the real polarity text runs)."""
    from transformers import BertConfig, BertModel

    from tests.tiny_models import TINY_SHAPE

    torch.manual_seed(0)
    cfg = BertConfig(**{**TINY_SHAPE, "vocab_size": 30522})
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm_folder / name, folder / name)
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
