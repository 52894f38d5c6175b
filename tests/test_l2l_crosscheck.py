"""Cross-checks against learn2learn, a library the field already uses (skipped when it is not installed).

* Our MAML plugin (through ``higher``) and ``learn2learn.algorithms.MAML``, from the same initial
  weights on the same episode with the same inner lr and steps, give the same adapted query
  logits and the same meta-gradients, second and first order (float64).
* Our ProtoNet logits equal ``learn2learn.nn.PrototypicalClassifier``'s and the documented
  formula (negative squared Euclidean distance to class means), computed independently.
"""
import contextlib
import copy
import io

import pytest
import torch
import torch.nn.functional as F

with contextlib.redirect_stderr(io.StringIO()):  # gym prints a deprecation notice on import
    l2l = pytest.importorskip("learn2learn")

from fewshot_nsl.backbones import cnn4  # noqa: E402
from fewshot_nsl.registry import create_method  # noqa: E402

from conftest import synthetic_episode  # noqa: E402

SIZE, WAYS, SHOTS, QUERIES = 16, 5, 2, 3


@pytest.fixture
def episode():
    return synthetic_episode(WAYS, SHOTS, QUERIES, 0, SIZE, separation=0.0, dtype=torch.float64)


def our_maml(**options):
    torch.manual_seed(0)
    return create_method("maml", backbone=cnn4(filters=4), image_size=SIZE, ways=WAYS, **options).double()


def l2l_adapt(method, sx, sy, steps, first_order):
    """learn2learn's MAML on a copy of our method's (backbone + head) with the same weights."""
    maml = l2l.algorithms.MAML(copy.deepcopy(method.network()), lr=method.inner_lr, first_order=first_order)
    learner = maml.clone()
    for _ in range(steps):
        learner.adapt(F.cross_entropy(learner(sx), sy))
    return maml, learner


@pytest.mark.parametrize("first_order", [False, True], ids=["second_order", "first_order"])
def test_maml_matches_learn2learn_logits_and_meta_gradients(episode, first_order):
    sx, sy, qx, qy = episode
    method = our_maml(first_order=first_order, inner_steps=3, inner_lr=0.1).train()
    maml, learner = l2l_adapt(method, sx, sy, 3, first_order)

    # adapted query logits (training path, graph kept through the inner loop)
    fnet, fast = method.adapt(sx, sy, 3, track_higher_grads=True)
    ref_logits = learner(qx)
    torch.testing.assert_close(fnet(qx, params=fast), ref_logits, rtol=1e-9, atol=1e-10)

    # meta-gradients of the query loss with respect to the initial weights
    loss = method.loss(sx, sy, qx, qy)
    ref_loss = F.cross_entropy(ref_logits, qy)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-10)
    loss.backward()
    ref_loss.backward()
    ours = list(method.parameters())
    theirs = list(maml.parameters())
    assert len(ours) == len(theirs)
    for p, q in zip(ours, theirs):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10)


def test_maml_test_time_adaptation_matches_learn2learn(episode):
    sx, sy, qx, _ = episode
    method = our_maml(inner_steps_test=4).eval()
    with torch.no_grad():  # as the harness calls it
        method.fit_support(sx, sy)
        logits = method(qx)
    _, learner = l2l_adapt(method, sx, sy, 4, first_order=True)
    torch.testing.assert_close(logits, learner(qx).detach(), rtol=1e-9, atol=1e-10)


def test_protonet_logits_match_learn2learn_and_the_formula(episode):
    sx, sy, qx, _ = episode
    torch.manual_seed(0)
    method = create_method("protonet", backbone=cnn4(filters=4), image_size=SIZE).double().eval()
    with torch.no_grad():
        method.fit_support(sx, sy)
        logits = method(qx)
        zs, zq = method.backbone(sx), method.backbone(qx)
    clf = l2l.nn.PrototypicalClassifier(distance="euclidean")
    clf.fit_(zs, sy)
    torch.testing.assert_close(logits, clf(zq), rtol=1e-9, atol=1e-9)
    # the documented formula, written out: -||z_q - mean_{i: y_i = c} z_i||^2
    means = torch.stack([zs[sy == c].mean(0) for c in range(WAYS)])
    formula = -((zq[:, None, :] - means[None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(logits, formula, rtol=1e-9, atol=1e-9)
