"""Rows to tensors for each task, the way the model was pretrained to read them.

Windows and examples start with the tokenizer's BOS token when the tokenizer adds one
(Llama-3, Gemma); instructions go through the tokenizer's chat template when it has
one, and only the response tokens carry a label (-100 elsewhere). Rows longer than the
sequence length are cut, and the count is returned so the stage can report it.
"""

from dataclasses import dataclass

import pandas as pd
import torch

from lqlora_dagster.data.checks import first_text, label_key
from lqlora_dagster.data.datasets import Columns
from lqlora_dagster.data.windows import token_windows
from lqlora_dagster.errors import LQLoRAInputError

IGNORE = -100  # label of a token that is not trained on (transformers' convention)


@dataclass(frozen=True)
class Encoded:
    tensors: dict[str, torch.Tensor]  # input_ids, attention_mask, labels: (N, seq_len) or labels (N,)
    truncated: int  # rows cut to the sequence length


def bos_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one in front of a text, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids[:1] == [bos] else None


def pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def lm_windows(ids: torch.Tensor, seq_len: int, bos: int | None) -> torch.Tensor:
    """(N, seq_len) windows of a token stream, each led by BOS when the model expects it."""
    if bos is None:
        return token_windows(ids, seq_len)
    body = token_windows(ids, seq_len - 1)
    return torch.cat([torch.full((len(body), 1), bos, dtype=torch.long), body], dim=1)


def _prompt_and_response(row: pd.Series, use: Columns) -> tuple[list[dict], str]:
    """(chat turns before the response, the response) of an instruction row."""
    if use.messages:
        turns = [{"role": t["role"], "content": t["content"]} for t in row[use.messages]]
        return turns[:-1], turns[-1]["content"]
    prompt = str(first_text(row[use.prompt]))
    if use.input and isinstance(row.get(use.input), str) and row[use.input].strip():
        prompt = f"{prompt}\n\n{row[use.input]}"
    return [{"role": "user", "content": prompt}], str(first_text(row[use.response]))


def _instruction_ids(tokenizer, turns: list[dict], response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        prompt = list(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False))
        full = list(tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": response}], tokenize=True, return_dict=False))
        if full[: len(prompt)] == prompt and len(full) > len(prompt):
            return prompt, full[len(prompt):]
    text = "\n\n".join(t["content"] for t in turns) + "\n\n"
    prompt = tokenizer(text)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    return prompt, tokenizer(response, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])


def instruction_examples(tokenizer, rows: pd.DataFrame, use: Columns, seq_len: int) -> Encoded:
    """input_ids / attention_mask / labels, labels only on the response tokens."""
    ids = torch.full((len(rows), seq_len), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    truncated = 0
    for i, (_, row) in enumerate(rows.iterrows()):
        prompt, response = _instruction_ids(tokenizer, *_prompt_and_response(row, use))
        if len(prompt) + len(response) > seq_len:
            truncated += 1
            keep_prompt = max(seq_len - len(response), seq_len // 2)
            prompt = prompt[-keep_prompt:]  # the end of the prompt is what the response answers
            response = response[: seq_len - len(prompt)]
        n = len(prompt) + len(response)
        ids[i, :n] = torch.tensor(prompt + response)
        mask[i, :n] = 1
        labels[i, len(prompt):n] = torch.tensor(response)
    if int((labels != IGNORE).sum()) == 0:
        raise LQLoRAInputError("no response token survived the sequence length; raise --finetune-len / --eval-len")
    return Encoded({"input_ids": ids, "attention_mask": mask, "labels": labels}, truncated)


def classification_examples(tokenizer, rows: pd.DataFrame, use: Columns, labels: tuple[str, ...], seq_len: int) -> Encoded:
    """input_ids / attention_mask padded or cut to seq_len, and the label's index."""
    if rows.empty:
        raise LQLoRAInputError("no sentences to encode")
    index = {label: i for i, label in enumerate(labels)}
    keys = [label_key(v) for v in rows[use.label]]
    unknown = sorted(set(keys) - set(index))
    if unknown:
        raise LQLoRAInputError(
            f"label(s) {', '.join(map(repr, unknown[:5]))} are not among the training labels {list(labels)}"
        )
    texts = [str(t) for t in rows[use.text]]
    lengths = [len(x) for x in tokenizer(texts)["input_ids"]]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return Encoded(
        {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
         "labels": torch.tensor([index[k] for k in keys])},
        sum(n > seq_len for n in lengths),
    )
