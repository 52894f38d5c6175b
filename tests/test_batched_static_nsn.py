"""The batched evaluation path of ``static_nsn`` (:meth:`StaticNSN.evaluate_episodes`, issue 29) against the
per-episode path, episode by episode in float64, and its per-episode network
(:mod:`fewshot_nsl.methods.batched_convnet`) against the wrapped backbone."""
import copy

import pytest
import torch

from fewshot_nsl.backbones import cnn4, cnn9
from fewshot_nsl.methods.base import FewShotMethod
from fewshot_nsl.methods.batched_convnet import conv_steps, episode_forward, plan_backbone
from fewshot_nsl.nn import similarity_parameters, wrap_convs_static

from batched_equivalence import assert_same_logits, both_paths, build


@pytest.mark.parametrize("structure", ["dns", "uns"])
@pytest.mark.parametrize("make", [lambda: cnn4(filters=8), lambda: cnn9(stem=4, widths=(4, 6, 8)),
                                  lambda: cnn9(stem=4, widths=(4, 6, 8), global_pool=True)])
def test_episode_forward_equals_wrapped_backbone(structure, make):
    torch.manual_seed(0)
    bb = make().double()
    for m in bb.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2), m.bias.data.normal_()
    bb.eval()
    steps = plan_backbone(bb)
    e, b = 3, 2
    x = torch.randn(e, b, 3, 19, 19, dtype=torch.float64)
    sims = [torch.randn(e, 9, dtype=torch.float64) if structure == "dns" else torch.randn(e, 9, 9, dtype=torch.float64)
            for _ in conv_steps(steps)]
    sims = [s.requires_grad_(True) for s in sims]
    got = episode_forward(steps, x, sims)
    grads = torch.autograd.grad(got.pow(2).sum(), sims)
    for k in range(e):
        net = wrap_convs_static(copy.deepcopy(bb), structure=structure).eval()
        params = similarity_parameters(net)
        with torch.no_grad():
            for p, s in zip(params, sims):
                p.copy_(s[k])
        ref = net(x[k])
        torch.testing.assert_close(got[k], ref, rtol=1e-10, atol=1e-12)
        ref_grads = torch.autograd.grad(ref.pow(2).sum(), params)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g[k], r, rtol=1e-9, atol=1e-11)


def test_plan_refuses_other_backbones():
    bb = cnn4(filters=4)
    bb.blocks[0][0] = torch.nn.Conv2d(3, 4, 3, padding=1, dilation=1, groups=1, padding_mode="reflect")
    assert plan_backbone(bb) is None
    assert plan_backbone(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))) is None


@pytest.mark.parametrize("profile", ["quick", "paper", "smoke"])
@pytest.mark.parametrize("structure", ["dns", "uns"])
def test_static_nsn_batched_equals_per_episode(profile, structure):
    method = build("static_nsn", profile, method_options={"structure": structure, "epochs": 3})
    ref, got = both_paths(method)
    assert_same_logits(ref, got)


@pytest.mark.parametrize("shots", [1, 2])
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("warmup", [0, 4])
def test_static_nsn_batched_regularised_warmup_shots(shots, centered, warmup):
    opts = {"structure": "dns", "epochs": 3, "similarity_l2": 0.05, "similarity_l2_centered": centered,
            "head_warmup_epochs": warmup, "optimizer": "sgd", "batch_size": 3}
    method = build("static_nsn", "paper", method_options=opts, shots=shots)
    ref, got = both_paths(method, shots=shots)
    assert_same_logits(ref, got)


@pytest.mark.parametrize("fold", [True, False])
def test_static_nsn_batched_fold_and_uns_adam(fold):
    opts = {"structure": "uns", "epochs": 2, "fold": fold, "optimizer": "adam", "batch_size": None,
            "head_warmup_epochs": 3}
    ref, got = both_paths(build("static_nsn", "quick", method_options=opts))
    assert_same_logits(ref, got)


def test_static_nsn_batched_chunks_of_episodes(monkeypatch):
    """Episodes trained in several chunks give the same logits as one chunk."""
    method = build("static_nsn", "paper", method_options={"epochs": 2})
    monkeypatch.setattr(type(method), "_chunk_episodes", lambda self, *a: 2)  # noqa: ARG005
    ref, got = both_paths(method, n=5)
    assert_same_logits(ref, got)


def test_static_nsn_replays_the_draws_of_fit_support():
    """The replayed draws leave the RNG where ``fit_support`` leaves it (wrapping draws a weight per conv). Without
    folding: ``fold_all`` builds each ``nn.Conv2d`` (more draws), but only after the last draw that shapes the logits."""
    method = build("static_nsn", "paper", method_options={"epochs": 2, "head_warmup_epochs": 2, "fold": False})
    sx = torch.randn(10, 3, 16, 16, dtype=torch.float64)
    sy = torch.arange(5).repeat(2)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    with torch.no_grad():
        method.fit_support(sx, sy)
    after = torch.get_rng_state()
    torch.set_rng_state(before)
    method._replay_wrap_draws()
    torch.nn.Linear(method.feature_dim, 5)
    for _ in range(4):  # 2 warm-up + 2 joint passes of batch 4 over 10 items
        torch.randperm(10)
    assert torch.equal(torch.get_rng_state(), after)


def test_static_nsn_batched_under_autocast_takes_the_per_episode_path():
    method = build("static_nsn", "smoke", method_options={"epochs": 1, "head_warmup_epochs": 1}).float()
    method.batched_on_cpu = True
    assert method.supports_batched_evaluation()
    sx, sy = torch.randn(2, 10, 3, 16, 16), torch.arange(5).repeat(2).expand(2, 10).contiguous()
    qx = torch.randn(2, 3, 3, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = FewShotMethod.evaluate_one_by_one(method, sx, sy, qx, [1, 2], 5)
        got = method.evaluate_episodes(sx, sy, qx, [1, 2], 5)
    assert torch.equal(ref, got)


def test_static_nsn_other_backbone_is_per_episode():
    """A backbone class with its own forward_map is not planned: the per-episode path."""
    method = build("static_nsn", "smoke")
    assert not method.supports_batched_evaluation()  # off on a CPU by default
    method.batched_on_cpu = True
    assert method.supports_batched_evaluation()
    method.backbone.__class__ = type("Custom", (type(method.backbone),), {"forward_map": lambda self, x: self.blocks(x)})
    assert not method.supports_batched_evaluation()
