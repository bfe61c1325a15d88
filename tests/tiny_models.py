"""Tiny random models and a tiny tokenizer, built in code (no download, no real model).

The one place that says what "the tiny model" is: tests and fixtures build their models
and tokenizers here, with overrides where a test needs another shape."""

from pathlib import Path

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


def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges (every byte one token) plus SmolLM2's
    special tokens and a chat template: any text encodes, and the instruction path runs
    through the chat template as it does on the real model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = [*SPECIAL_TOKENS, *sorted(pre_tokenizers.ByteLevel.alphabet())]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
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
