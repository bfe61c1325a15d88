"""A tiny registered model in a temporary LQLORA_HOME, and small run configs."""

import shutil
from pathlib import Path

import pytest
import torch

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


def tiny_run_config(budgets=(3.0,), methods=("lqlora-fisher",), steps=3) -> dict:
    return {
        "ops": {
            "calibration_batches": {"config": {"n_sequences": 4, "seq_len": 64}},
            "error_table": {"config": {"methods": list(methods), "rank": 4, "grid": "reduced"}},
            "allocation_plan": {"config": {"budgets": list(budgets)}},
            "finetuned_adapters": {"config": {"steps": steps, "batch_size": 2, "seq_len": 64}},
            "evaluation": {"config": {"seq_len": 64, "n_windows": 4}},
        }
    }
