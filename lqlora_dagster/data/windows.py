"""Cut tokenized text into fixed-length windows (calibration, training, perplexity)."""

import torch

from lqlora_dagster.errors import LQLoRAInputError


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids (no special tokens)."""
    if not isinstance(text, str) or not text.strip():
        raise LQLoRAInputError("the text is empty; give at least one window's worth of text")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(
    ids: torch.Tensor, seq_len: int, n_windows: int | None = None, seed: int | None = None
) -> torch.Tensor:
    """(N, seq_len) non-overlapping windows of `ids`.

    All windows in order when `n_windows` is None; otherwise `n_windows` of them, spread
    evenly (seed None) or drawn without replacement with `seed`.
    """
    if seq_len < 2:
        raise LQLoRAInputError(f"sequence length must be >= 2 tokens, got {seq_len}")
    available = ids.numel() // seq_len
    if available < 1:
        raise LQLoRAInputError(
            f"the text has {ids.numel()} tokens, shorter than one window of {seq_len}; "
            "give more text or a shorter sequence length"
        )
    windows = ids[: available * seq_len].reshape(available, seq_len)
    if n_windows is None:
        return windows
    if n_windows < 1 or n_windows > available:
        raise LQLoRAInputError(
            f"asked for {n_windows} windows of {seq_len} tokens, but the text holds {available}; "
            "ask for fewer windows, shorter ones, or give more text"
        )
    if seed is None:
        pick = torch.linspace(0, available - 1, n_windows).round().long()
    else:
        pick = (
            torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n_windows].sort().values
        )
    return windows[pick]


def check_token_ids(batches: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Token ids that fit the model's vocabulary (catches a tokenizer/model mismatch)."""
    if batches.dtype != torch.long or batches.dim() != 2:
        raise LQLoRAInputError(
            f"token batches must be a 2-D LongTensor, got {batches.dtype} {tuple(batches.shape)}"
        )
    top = int(batches.max())
    if top >= vocab_size or int(batches.min()) < 0:
        raise LQLoRAInputError(
            f"token id {top} does not fit the model's vocabulary of {vocab_size}: the tokenizer "
            "does not belong to this model"
        )
    return batches
