"""What a user compares methods by: perplexity, accuracy, storage, peak memory."""

import math
import resource
import sys
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


@torch.no_grad()
def accuracy(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 64,
) -> float:
    device = next(model.parameters()).device
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        sl = slice(start, start + batch_size)
        logits = model(
            input_ids=input_ids[sl].to(device), attention_mask=attention_mask[sl].to(device)
        ).logits
        correct += int((logits.argmax(-1).cpu() == labels[sl]).sum())
    return correct / len(labels)


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


def peak_memory_mb(device: torch.device | str = "cpu") -> float:
    """Peak accelerator memory on CUDA; peak resident set size of the process on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
