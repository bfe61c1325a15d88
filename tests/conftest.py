"""Shared fixtures: tiny models built in code, and the real bundled SmolLM2 (cached)."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


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
