"""Tiny random models and a tiny tokenizer, built in code (no download, no real model).

The one place that says what "the tiny model" is: tests and fixtures build their models
and tokenizers here, with overrides where a test needs another shape."""

from pathlib import Path

import numpy as np
import torch

# the block shape every tiny architecture shares; vocab_size matches `tokens()`
TINY_SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    vocab_size=256,
    max_position_embeddings=128,
)

SMOLLM2_VOCAB = 49152
# SmolLM2's special tokens at its ids (0, 1, 2), so a config's default bos/eos ids match
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# SmolLM2's chat format without its system prompt (which alone fills a 64-byte window)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_llama_config(**overrides):
    """SmolLM2's layout (grouped-query attention, tied embeddings) at 64 wide, 2 layers."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY_SHAPE, "num_key_value_heads": 2, "tie_word_embeddings": True, **overrides})


def tiny_llama(seed: int = 0, **overrides):
    """A random tiny Llama; `overrides` change its config (another width, vocabulary, ...)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def tiny_tokenizer(merges: tuple[tuple[str, str], ...] = ()):
    """A byte-level BPE tokenizer, by default with no merges (every byte one token), plus
    SmolLM2's special tokens and a chat template: any text encodes, and the instruction
    path runs through the chat template as it does on the real model. `merges` (pairs of
    byte-level symbols, e.g. ("Ġ", "t")) add their joined tokens after the bytes, as a
    trained BPE vocabulary has them (llama.cpp loads no BPE vocabulary without merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = [*SPECIAL_TOKENS, *sorted(pre_tokenizers.ByteLevel.alphabet()), *(a + b for a, b in merges)]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<|endoftext|>", bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_llama(folder: Path, seed: int = 0, tokenizer=None, **overrides) -> Path:
    """A tiny Llama and its tokenizer (the tiny one unless given) as a Hugging Face folder;
    256 positions. The embedding keeps SmolLM2's 49,152 rows unless `vocab_size` says
    otherwise (the tiny tokenizer uses the first 259): the weights and sizes are those the
    tiny model had with SmolLM2's tokenizer, whose 12.58 MB of embeddings tests count."""
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = {"vocab_size": SMOLLM2_VOCAB, "max_position_embeddings": 256, **ids, **overrides}
    folder.mkdir(parents=True, exist_ok=True)
    tiny_llama(seed, **config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(**{**TINY_SHAPE, "max_position_embeddings": 64}, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tokens(n: int = 4, length: int = 32, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


# --- a tiny Llama as llama.cpp writes it (GGUF) ---------------------------------------------

GGUF_HIDDEN, GGUF_INTER, GGUF_KV_ROWS = 64, 128, 32


def gguf_tensors() -> dict[str, np.ndarray]:
    """A 2-layer Llama's tensors under llama.cpp's names (vocabulary of 258 tokens)."""
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (258, GGUF_HIDDEN), "output_norm.weight": (GGUF_HIDDEN,)}
    for i in range(2):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (GGUF_HIDDEN,),
            f"blk.{i}.ffn_norm.weight": (GGUF_HIDDEN,),
            f"blk.{i}.attn_q.weight": (GGUF_HIDDEN, GGUF_HIDDEN),
            f"blk.{i}.attn_k.weight": (GGUF_KV_ROWS, GGUF_HIDDEN),
            f"blk.{i}.attn_v.weight": (GGUF_KV_ROWS, GGUF_HIDDEN),
            f"blk.{i}.attn_output.weight": (GGUF_HIDDEN, GGUF_HIDDEN),
            f"blk.{i}.ffn_gate.weight": (GGUF_INTER, GGUF_HIDDEN),
            f"blk.{i}.ffn_up.weight": (GGUF_INTER, GGUF_HIDDEN),
            f"blk.{i}.ffn_down.weight": (GGUF_HIDDEN, GGUF_INTER),
        }
    return {name: (rng.standard_normal(shape) * 0.02).astype(np.float32) for name, shape in shapes.items()}


def write_gguf(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """An fp32 Llama GGUF with a byte-level BPE vocabulary and the given tensors (none:
    a vocabulary-only file, as llama.cpp's `--vocab-only` writes)."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [*bytes_to_unicode().values(), "he", "<|endoftext|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(GGUF_HIDDEN)
    w.add_feed_forward_length(GGUF_INTER)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(["h e"])
    w.add_eos_token_id(len(tokens) - 1)
    for name, value in tensors.items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
