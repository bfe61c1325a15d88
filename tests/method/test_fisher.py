"""The Fisher diagonal against its definition: the mean over examples of each example's
squared gradient, here computed one example and one weight at a time with
torch.autograd.grad on the tiny model."""

import torch

from lqlora_dagster.fisher import estimate_fisher
from lqlora_dagster.models.loading import load_model
from lqlora_dagster.models.targets import find_targets


def _by_definition(model, windows, names):
    weights = [model.get_submodule(n).weight for n in names]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    sums = [torch.zeros_like(w) for w in weights]
    for i in range(len(windows)):
        loss = model(input_ids=windows[i : i + 1], labels=windows[i : i + 1]).loss
        for s, g in zip(sums, torch.autograd.grad(loss, weights)):
            s += g.square()
    return {n: s / len(windows) for n, s in zip(names, sums)}


def test_fisher_is_the_mean_squared_per_example_gradient(tiny_llama_folder):
    model = load_model(tiny_llama_folder, "causal-lm")
    targets = find_targets(model)
    windows = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fisher = estimate_fisher(model, windows, targets)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # restored
    assert all(model.get_submodule(t.name).weight.grad is None for t in targets)  # nothing left behind
    expected = _by_definition(model, windows, [t.name for t in targets])
    assert set(fisher) == set(expected)
    for name, f in fisher.items():
        assert f.shape == expected[name].shape and f.dtype == torch.float32
        assert torch.equal(f, expected[name])  # same graph, same order: bit for bit
        assert (f > 0).any()
