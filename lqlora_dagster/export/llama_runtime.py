"""Running a GGUF file in llama.cpp (through llama-cpp-python): perplexity on the run's
own token windows, and generation with sampling.

Perplexity is computed from llama.cpp's logits on the same token ids our evaluation
uses (each window predicts its L-1 next tokens), so the two numbers differ only by what
the runtimes compute, not by how text was tokenized.
"""

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lqlora_dagster.errors import LQLoRAInputError
from lqlora_dagster.export.ggml_quant import INSTALL
from lqlora_dagster.sampling import Sampling


def load(path: Path, n_ctx: int, threads: int | None = None, logits_all: bool = False):
    try:
        from llama_cpp import Llama  # an optional extra: only exports and its engine load it
    except ImportError as err:
        raise LQLoRAInputError(f"running a GGUF file needs llama.cpp: {INSTALL}") from err
    if not Path(path).is_file():
        raise LQLoRAInputError(f"{path} does not exist; export a GGUF first (`lqlora export --format gguf`)")
    threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count() or 1
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                 n_threads_batch=threads, logits_all=logits_all, verbose=False)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def perplexity(path: Path, windows: torch.Tensor, threads: int | None = None) -> float:
    """exp(mean next-token NLL) of llama.cpp on (N, L) token windows."""
    n, length = windows.shape
    llm = load(path, n_ctx=length, threads=threads, logits_all=True)
    vocab = llm.n_vocab()
    if int(windows.max()) >= vocab:
        raise LQLoRAInputError(f"{path} has a vocabulary of {vocab} tokens; the windows use id {int(windows.max())}")
    total, count = 0.0, 0
    for row in tqdm(windows.tolist(), desc="llama.cpp perplexity", disable=None):
        llm.reset()
        llm.eval(row)
        logp = _log_softmax(np.asarray(llm.scores[: length - 1], dtype=np.float64))
        total -= float(logp[np.arange(length - 1), row[1:]].sum())
        count += length - 1
    return math.exp(total / count)


def stream(path: Path, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling,
           threads: int | None = None) -> Iterator[tuple[int, str]]:
    """(token id, its text) as llama.cpp generates them."""
    llm = load(path, n_ctx=len(prompt_ids) + max_new_tokens, threads=threads)
    llm.set_seed(sampling.seed)
    made = 0
    for token in llm.generate(prompt_ids, temp=sampling.temperature, top_p=sampling.top_p, top_k=0, min_p=0.0,
                              repeat_penalty=1.0, reset=True):
        if token == llm.token_eos() or made >= max_new_tokens:
            break
        made += 1
        yield token, llm.detokenize([token]).decode("utf-8", errors="replace")


def decode_speed(path: Path, prompt_ids: list[int], max_new_tokens: int, threads: int | None = None) -> dict:
    """Prefill and greedy decode tokens/s of llama.cpp on this file: the prompt's time is
    up to the first new token, decoding the time of the ones after it."""
    llm = load(path, n_ctx=len(prompt_ids) + max_new_tokens + 1, threads=threads)
    llm.eval(prompt_ids[:8])  # warm the kernels and buffers outside the timing
    start, first, made = time.perf_counter(), None, 0
    for _ in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
        made += 1
        if made == 1:
            first = time.perf_counter()
        if made >= max_new_tokens:
            break
    end = time.perf_counter()
    return {"prefill_tok_s": len(prompt_ids) / (first - start),
            "decode_tok_s": (made - 1) / (end - first) if made > 1 else float("nan")}
