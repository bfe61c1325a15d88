"""Empirical Fisher diagonal of every target matrix of a causal LM or a classifier.

F = mean over calibration examples of (d loss_s / d W)^2, one backward pass per
example (squared per-example gradients, not the square of a batch gradient). For a
causal LM an example is a token window (next-token loss); for a classifier it is one
labelled sentence (cross-entropy of its label).
Only target weights require grad during the passes, then flags are restored.
"""

from collections.abc import Callable

import torch

from lqlora_dagster.data.windows import check_token_ids
from lqlora_dagster.models.targets import Target


def estimate_fisher(
    model: torch.nn.Module,
    batches: torch.Tensor | dict[str, torch.Tensor],
    targets: list[Target],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """{target name: (out, in) float32 Fisher diagonal} on the model's device.

    `batches` is (n, seq) token windows, or {input_ids, attention_mask, labels} with
    one row per example (labels: the class, or the tokens to predict; windows without
    labels predict every next token)."""
    examples = dict(batches) if isinstance(batches, dict) else {"input_ids": batches}
    examples.setdefault("labels", examples["input_ids"])  # token windows: every next token
    check_token_ids(examples["input_ids"], model.get_input_embeddings().num_embeddings)
    count = len(examples["input_ids"])
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
        for i in range(count):
            loss = model(**{k: v[i : i + 1].to(device) for k, v in examples.items()}).loss
            grads = torch.autograd.grad(loss, list(weights.values()))
            for (name, _), g in zip(weights.items(), grads):
                sums[name].add_(g.detach().to(torch.float32).square())
            if progress is not None:
                progress(i + 1, count)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
        model.train(was_training)
    by_target = {t.name: t for t in targets}
    return {
        name: (s / count).T.contiguous() if by_target[name].transposed else s / count
        for name, s in sums.items()
    }
