"""The batched evaluation path: the tools (:mod:`fewshot_nsl.methods.batched`), the harness's use of it
(:func:`fewshot_nsl.evaluation.evaluate`) and the equivalence with the per-episode path for the head-training
methods (finetune with Chen et al.'s protocol, dynamic NSN)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_nsl.methods.batched import (
    BatchedAdam,
    BatchedSGD,
    fit_linear_heads,
    linear_init,
    linear_logits,
    replay_draws,
    seed_torch,
    support_orders,
)
from fewshot_nsl.methods.head_training import fit_linear_head

from batched_equivalence import assert_same_logits, both_paths, build


@pytest.mark.parametrize("optimizer,opts", [
    ("sgd", dict(momentum=0.9, dampening=0.9, weight_decay=1e-3)),
    ("sgd", dict(momentum=0.0, dampening=0.0, weight_decay=0.0)),
    ("adam", dict(momentum=0.9, dampening=0.0, weight_decay=1e-3)),
])
@pytest.mark.parametrize("batch_size", [4, None])
def test_fit_linear_heads_equals_fit_linear_head_per_episode(optimizer, opts, batch_size):
    torch.manual_seed(1)
    e, s, d, ways, epochs = 4, 10, 7, 5, 6
    feats = torch.randn(e, s, d, dtype=torch.float64)
    labels = torch.randint(0, ways, (e, s))
    seeds = [11, 12, 13, 14]

    def draw():
        w, b = linear_init(d, ways, torch.device("cpu"), torch.float64)
        return w, b, support_orders(s, epochs, batch_size, torch.device("cpu"))

    w0, b0, orders = replay_draws(seeds, torch.device("cpu"), draw)
    w, b = fit_linear_heads(w0, b0, feats, labels, orders, batch_size=batch_size, lr=0.05, optimizer=optimizer, **opts)
    for k, seed in enumerate(seeds):
        seed_torch(seed, torch.device("cpu"))
        head = nn.Linear(d, ways).double()
        fit_linear_head(head, feats[k], labels[k], epochs=epochs, batch_size=batch_size, lr=0.05, optimizer=optimizer,
                        **opts)
        torch.testing.assert_close(w[k], head.weight.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b[k], head.bias.detach(), rtol=1e-10, atol=1e-12)


def test_batched_sgd_and_adam_follow_torch_optim():
    torch.manual_seed(0)
    p0 = torch.randn(3, 4, dtype=torch.float64)
    grads = [torch.randn(3, 4, dtype=torch.float64) for _ in range(5)]
    for ours, theirs in ((lambda p: BatchedSGD([{"params": [p], "weight_decay": 0.01}], 0.1, 0.9, 0.5),
                          lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.01)),
                         (lambda p: BatchedAdam([{"params": [p], "weight_decay": 0.01}], 0.1),
                          lambda p: torch.optim.Adam([p], lr=0.1, weight_decay=0.01))):
        a, b = p0.clone(), p0.clone().requires_grad_(True)
        opt_a, opt_b = ours(a), theirs(b)
        for g in grads:
            opt_a.step([g])
            b.grad = g.clone()
            opt_b.step()
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)


def test_linear_logits_shape():
    w, b, x = torch.randn(2, 5, 3), torch.randn(2, 5), torch.randn(2, 4, 3)
    out = linear_logits(w, b, x)
    assert out.shape == (2, 4, 5)
    torch.testing.assert_close(out[1], F.linear(x[1], w[1], b[1]))


@pytest.mark.parametrize("profile", ["quick", "paper", "smoke"])
def test_dynamic_nsn_batched_equals_per_episode(profile):
    method = build("dynamic_nsn", profile, method_options={"epochs": 3})
    ref, got = both_paths(method)
    assert_same_logits(ref, got)


@pytest.mark.parametrize("profile", ["quick", "smoke"])
def test_finetune_head_batched_equals_per_episode(profile):
    method = build("finetune", profile, method_options={"epochs": 3})
    ref, got = both_paths(method, shots=3)
    assert_same_logits(ref, got)
