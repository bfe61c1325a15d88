"""What a user compares methods by: perplexity, mean loss, accuracy and macro-F1, storage."""

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lqlora_dagster.data.windows import check_token_ids
from lqlora_dagster.surgery.injector import lq_layers


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over fixed-length windows (each predicts L-1 tokens)."""
    check_token_ids(windows, model.get_input_embeddings().num_embeddings)
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=None):
        ids = windows[start : start + batch_size].to(device)
        loss = model(input_ids=ids, labels=ids).loss
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += loss.item() * n
        count += n
    return math.exp(total / count)


def _predicted(batch: dict[str, torch.Tensor]) -> int:
    """How many targets a batch's mean loss averages over (tokens, or examples)."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return len(labels)
    return int((labels[:, 1:] != -100).sum())


@torch.no_grad()
def mean_loss(model: torch.nn.Module, examples: dict[str, torch.Tensor], batch_size: int = 4) -> float:
    """Mean loss per predicted target over all examples (token windows train on every
    next token; instruction rows on their response tokens; sentences on their label)."""
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples["input_ids"]), batch_size):
        batch = {k: v[start : start + batch_size] for k, v in examples.items()}
        batch.setdefault("labels", batch["input_ids"])
        n = _predicted(batch)
        if n == 0:
            continue
        total += model(**{k: v.to(device) for k, v in batch.items()}).loss.item() * n
        count += n
    if count == 0:
        raise ValueError("no example has a target to predict")
    return total / count


@torch.no_grad()
def classification_scores(
    model: torch.nn.Module, examples: dict[str, torch.Tensor], batch_size: int = 64
) -> dict[str, float]:
    """Accuracy and macro-F1 (the mean over labels of each label's F1)."""
    device = next(model.parameters()).device
    model.eval()
    labels = examples["labels"]
    preds = []
    for start in range(0, len(labels), batch_size):
        sl = slice(start, start + batch_size)
        logits = model(
            input_ids=examples["input_ids"][sl].to(device), attention_mask=examples["attention_mask"][sl].to(device)
        ).logits
        preds.append(logits.argmax(-1).cpu())
    pred = torch.cat(preds)
    f1s = []
    for c in range(int(model.config.num_labels)):
        tp = int(((pred == c) & (labels == c)).sum())
        fp, fn = int(((pred == c) & (labels != c)).sum()), int(((pred != c) & (labels == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": float((pred == labels).float().mean()), "macro_f1": sum(f1s) / len(f1s)}


@dataclass(frozen=True)
class Storage:
    target_params: int  # weights in the quantized target matrices
    quantized_bytes: int  # packed Q of all targets
    lowrank_params: int  # entries of all L1, L2

    @property
    def bits_per_param(self) -> float:
        return 8 * self.quantized_bytes / self.target_params

    @property
    def bits_incl_lowrank(self) -> float:
        """Including L1, L2 stored in 16 bits."""
        return (8 * self.quantized_bytes + 16 * self.lowrank_params) / self.target_params


def storage(model: torch.nn.Module) -> Storage:
    layers = lq_layers(model).values()
    return Storage(
        target_params=sum(m.in_features * m.out_features for m in layers),
        quantized_bytes=sum(m.quantized().nbytes for m in layers),
        lowrank_params=sum(m.L1.numel() + m.L2.numel() for m in layers),
    )
