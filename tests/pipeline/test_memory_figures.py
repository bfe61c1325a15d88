"""The memory figures the graph stores in DuckDB tell a compressed model from fp32.

The whole graph runs on a Llama whose target weights dominate it (51 MB of them in
fp32, against a 257-entry byte-level vocabulary, so neither the embedding nor the
logits hide the difference, as they do on the tiny model with SmolLM2's 49k vocabulary),
and the `evaluations` rows must show the compressed model costing well under what the
fp32 reference costs to load and score."""

from pathlib import Path

import pytest
import torch

from lqlora_dagster.store.warehouse import Warehouse
from tests.conftest import registered_home
from tests.pipeline.conftest import tiny_run_config
from tests.pipeline.test_materialize import materialize

MODEL = "wide-llama"


def byte_level_tokenizer():
    """A real byte-level tokenizer with no merges (every byte one token) plus an EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"<|endoftext|>": len(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


@pytest.fixture(scope="module")
def wide_llama_folder(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=768, num_hidden_layers=2, intermediate_size=2048, num_attention_heads=12,
                      num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.bos_token_id)
    folder = tmp_path_factory.mktemp("wide-llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_evaluation_memory_in_duckdb_differs_between_fp32_and_compressed(tmp_path, wide_llama_folder):
    with registered_home(tmp_path, {MODEL: wide_llama_folder}) as (_, instance):
        # QLoRA-ILP: its error table needs no LQ iterations, so the whole graph runs in a minute
        result = materialize(tmp_path, tiny_run_config(methods=("qlora-ilp",), steps=1), instance, partition=MODEL)
    assert result.success
    rows = Warehouse(tmp_path / "lqlora.duckdb").query("SELECT stage, peak_mb FROM evaluations WHERE model = ?",
                                                     [MODEL]).set_index("stage")["peak_mb"]
    fp32, compressed = rows["reference"], rows["before_finetune"]
    assert fp32 > 40, rows  # the dense target weights alone are 51 MB
    assert compressed < 0.5 * fp32, rows  # 3 bits plus rank-4 factors: about a tenth of the weights' bytes
