"""Empirical Fisher diagonal of every target matrix of a causal LM.

F = mean over calibration sequences of (d loss_s / d W)^2, one backward pass per
sequence (squared per-sequence gradients, not the square of a batch gradient).
Only target weights require grad during the passes, then flags are restored.
"""

from collections.abc import Callable

import torch

from lqlora_dagster.data.windows import check_token_ids
from lqlora_dagster.models.targets import Target


def estimate_fisher(
    model: torch.nn.Module,
    batches: torch.Tensor,
    targets: list[Target],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """{target name: (out, in) float32 Fisher diagonal} on the model's device."""
    check_token_ids(batches, model.get_input_embeddings().num_embeddings)
    device = next(model.parameters()).device
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    weights = {t.name: model.get_submodule(t.name).weight for t in targets}
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        sums = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
        for i, seq in enumerate(batches):
            ids = seq[None].to(device)
            loss = model(input_ids=ids, labels=ids).loss
            grads = torch.autograd.grad(loss, list(weights.values()))
            for (name, _), g in zip(weights.items(), grads):
                sums[name].add_(g.detach().to(torch.float32).square())
            if progress is not None:
                progress(i + 1, len(batches))
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
        model.train(was_training)
    n = len(batches)
    by_target = {t.name: t for t in targets}
    return {name: (s / n).T.contiguous() if by_target[name].transposed else s / n for name, s in sums.items()}
