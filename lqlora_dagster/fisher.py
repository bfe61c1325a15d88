"""Empirical Fisher diagonal of every target matrix of a causal LM or a classifier.

F = mean over calibration examples of (d loss_s / d W)^2, one backward pass per
example (squared per-example gradients, not the square of a batch gradient). For a
causal LM an example is a token window (next-token loss); for a classifier it is one
labelled sentence (cross-entropy of its label).
Only target weights require grad during the passes, then flags are restored. Each
target's gradient is squared into its sum as soon as backward has produced it and then
dropped, and the means are taken in place: beyond the model the estimate holds the
sums and one gradient, not every target's gradient at once and then a copy of every mean.
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
    hooks = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        sums = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in weights.items()}
        for name, w in weights.items():
            w.grad = None
            hooks.append(w.register_post_accumulate_grad_hook(_square_into(sums[name])))
        for i in range(count):
            loss = model(**{k: v[i : i + 1].to(device) for k, v in examples.items()}).loss
            loss.backward()
            if progress is not None:
                progress(i + 1, count)
    finally:
        for hook in hooks:
            hook.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
        model.train(was_training)
    by_target = {t.name: t for t in targets}
    out = {}
    for name in list(sums):  # one matrix at a time: a transposed layout copies only that one
        mean = sums.pop(name).div_(count)
        out[name] = mean.T.contiguous() if by_target[name].transposed else mean
    return out


def _square_into(total: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """A post-accumulate-grad hook: add the weight's squared gradient to `total` and
    free the gradient."""

    def hook(weight: torch.Tensor) -> None:
        total.add_(weight.grad.detach().to(torch.float32).square())
        weight.grad = None

    return hook
