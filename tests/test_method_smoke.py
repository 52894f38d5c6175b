"""Smoke test of every registered method (timm's test_models.py style), on tiny images.

For each method, built exactly as a run builds it (smoke profile, per-method options):

* training: pretrain-stage methods get a gradient in every parameter of ``pretrain_module()``
  through a linear head; episodic methods get a finite ``loss`` and a gradient in every
  trainable parameter;
* evaluation (eval mode, ``torch.no_grad()``, as the harness runs it): ``fit_support`` +
  ``forward`` give finite ``(n_query, ways)`` logits, leave the method's parameters unchanged,
  and give the same logits for an episode whatever episode came before (no leakage).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_nsl.config import resolve_config
from fewshot_nsl.registry import get_method_class, list_methods
from fewshot_nsl.runner import build_method

from conftest import synthetic_episode  # noqa: E402

IMAGE_SIZE, WAYS, SHOTS, QUERIES = 16, 5, 2, 3


def smoke_method(name):
    cfg = resolve_config(
        {"method": name, "profile": "smoke", "dataset": "tiny", "image_size": IMAGE_SIZE, "ways": WAYS,
         "shots": SHOTS, "backbone": "cnn4", "backbone_options": {"filters": 8}, "device": "cpu"}
    )
    torch.manual_seed(0)
    return build_method(cfg)


def episode(seed):
    return synthetic_episode(WAYS, SHOTS, QUERIES, seed, IMAGE_SIZE)  # class-dependent mean: learnable


def missing_grads(params):
    return [n for n, p in params if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]


@pytest.mark.parametrize("name", list_methods())
def test_method_trains_and_evaluates(name):
    method = smoke_method(name)
    stages = get_method_class(name).training_stages
    sx, sy, qx, qy = episode(0)

    if "pretrain" in stages:  # as fewshot_nsl.training.pretrain: module + linear head, cross-entropy
        module = method.pretrain_module()
        module.train()
        head = nn.Linear(method.backbone.feature_dim(IMAGE_SIZE), WAYS)
        loss = F.cross_entropy(head(module(sx)), sy) + method.regularization()
        assert torch.isfinite(loss)
        loss.backward()
        assert not missing_grads(module.named_parameters()), "pretrain_module parameters without a gradient"
        method.zero_grad(set_to_none=True)
        method.after_pretrain()

    if "episodic" in stages:
        method.train()
        loss = method.loss(sx, sy, qx, qy) + method.regularization()
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        assert not missing_grads(method.named_parameters()), "trainable parameters without a gradient"
        method.zero_grad(set_to_none=True)

    method.eval()
    before = {n: p.detach().clone() for n, p in method.named_parameters()}

    def predict(ep):
        torch.manual_seed(123)  # the harness re-seeds before every episode
        with torch.no_grad():
            method.fit_support(ep[0], ep[1])
            return method(ep[2])

    logits = predict((sx, sy, qx))
    assert logits.shape == (len(qy), WAYS)
    assert torch.isfinite(logits).all()
    assert not logits.requires_grad
    for n, p in method.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed during evaluation"
    other = episode(1)
    predict(other[:3])
    again = predict((sx, sy, qx))
    torch.testing.assert_close(again, logits, msg="an earlier episode changed this episode's logits")
