"""What a method trains per test episode (a new linear head, a static NSN's ``M_s``, finetune's backbone copy) is made
and kept in the dtype of the method's weights (float32; float64 in the equivalence tests), never in the autocast
dtype of the features the backbone returns under ``--precision bf16|fp16`` (:mod:`fewshot_nsl.precision`: weights
and optimiser state stay in fp32), and every training step's forward sees the weights of that step.

Two ways this went wrong: a head made in the features' bf16 loses most of its updates (``lr * grad`` falls below one
bf16 rounding step, many weights never move in 100 passes); and autocast caches its bf16 copy of a float32 weight that
requires grad until its outermost region ends, which an in-place optimiser step does not invalidate, so a support-set
training loop inside the harness's autocast region ran every forward with the weights of its first step
(:func:`~fewshot_nsl.methods.head_training.drop_stale_casts`).

Each test runs a method at a tiny size (CNN-4 with 16 filters, 16 px) under CPU bf16 autocast, with Chen et al.'s head
training (SGD lr 0.01, momentum 0.9, dampening 0.9, weight decay 1e-3, batch 4, 100 passes) or Ravi & Larochelle's
whole-network finetuning, and checks that every trained tensor is float32, that (nearly) all its entries moved from
their initial values (the draws the seeded per-episode path makes; the batched path replays them), and that the
training lands where the same training in float32 lands, up to bf16 rounding.
"""
import sys
from typing import Dict, List, Tuple

import pytest
import torch
from torch import nn

from fewshot_nsl.evaluation import logits_gap
from fewshot_nsl.methods.base import FewShotMethod
from fewshot_nsl.methods.batched import episode_seed, seed_torch
from fewshot_nsl.methods.head_training import fit_linear_head
from fewshot_nsl.nn import similarity_parameters

from batched_equivalence import build
from conftest import synthetic_episode

CPU = torch.device("cpu")
BF16 = torch.bfloat16
WAYS, SHOTS, QUERIES, FILTERS = 5, 2, 3, 16
#: Chen et al.'s finetuning protocol (the paper profile's dynamic NSN, static NSN and finetune head).
CHEN = {"lr": 0.01, "momentum": 0.9, "dampening": 0.9, "weight_decay": 1e-3, "batch_size": 4, "epochs": 100}
#: Fraction of a trained head's (or M_s') entries that must differ from their initial values (all of them in fp32;
#: about a fifth moved when the head was trained in bf16).
MIN_MOVED = 0.97
#: How far the tensors trained under bf16 autocast may be from those trained in float32, relative to how far float32
#: training moved them (norms over all trained tensors): measured 0.007-0.05 (bf16 rounding), 0.18-0.35 with the
#: forward reading stale autocast copies of the weights.
MAX_BF16_DRIFT = 0.1

#: (registered name, method options); ``finetune_whole`` is the paper profile's finetune (Ravi & Larochelle: the whole
#: network, 15 full-batch plain SGD steps).
METHODS = {
    "dynamic_nsn": ("dynamic_nsn", dict(CHEN)),
    "finetune": ("finetune", dict(CHEN, finetune_backbone=False)),
    "finetune_whole": ("finetune", dict(lr=0.01, momentum=0.0, dampening=0.0, weight_decay=0.0, batch_size=None,
                                        epochs=15, finetune_backbone=True)),
    "static_nsn": ("static_nsn", dict(CHEN, structure="dns", optimizer="sgd", head_warmup_epochs=20)),
}


def _method(name: str) -> FewShotMethod:
    """``name`` built as a paper-profile run builds it, tiny, in float32 and eval mode."""
    registered, options = METHODS[name]
    return build(registered, "paper", method_options=options, shots=SHOTS, filters=FILTERS).float().eval()


def _initial_head(method: FewShotMethod, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The head's initial weight ``(ways, D)`` and bias ``(ways,)`` that ``fit_support`` draws after the RNG is
    seeded with ``seed`` (a static NSN first builds its wrapped convs)."""
    seed_torch(seed, CPU)
    if method.display_name() == "static_nsn":
        method._replay_wrap_draws()
    layer = nn.Linear(method.feature_dim, WAYS)
    return layer.weight.detach(), layer.bias.detach()


def _problems(trained: Dict[str, torch.Tensor], initial: Dict[str, torch.Tensor]) -> List[str]:
    """What is wrong with trained tensors: a dtype other than float32, or too few entries moved from ``initial``."""
    out = []
    for key, value in trained.items():
        if value.dtype != torch.float32:
            out.append(f"{key} is {value.dtype}")
        moved = (value.float() != initial[key].to(value.dtype).float()).double().mean().item()
        if moved < MIN_MOVED:
            out.append(f"{key}: only {moved:.0%} of {value.numel()} entries moved")
    return out


def _episode(seed: int = 0):
    sx, sy, qx, _ = synthetic_episode(WAYS, SHOTS, QUERIES, seed, 16)
    return sx, sy, qx


def _train_per_episode(method: FewShotMethod, name: str, seed: int, amp: bool) -> Dict[str, torch.Tensor]:
    """The tensors ``fit_support`` trains on an episode (for a static NSN, :meth:`adapt`'s unfolded ``M_s`` and head),
    with the RNG seeded by ``seed``, under CPU bf16 autocast (``amp``) or in float32."""
    sx, sy, qx = _episode()
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16, enabled=amp):
        seed_torch(seed, CPU)
        if name == "static_nsn":
            net, head = method.adapt(sx, sy)
            out = {f"M_s[{i}]": m for i, m in enumerate(similarity_parameters(net))}
        else:
            method.fit_support(sx, sy)
            head = method._episode[-1]
            logits = method(qx)
            assert logits.shape == (len(qx), WAYS) and torch.isfinite(logits).all()
            out = {f"backbone.{k}": v for k, v in method._episode[0].named_parameters()} if name == "finetune_whole" else {}
    return {"head.weight": head.weight.detach(), "head.bias": head.bias.detach(), **out}


def _flat(tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].double().flatten() for k in sorted(tensors)])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_per_episode_training_is_float32_under_bf16_autocast(name):
    method = _method(name)
    seed = episode_seed(0, 0)
    weight, bias = _initial_head(method, seed)
    initial = {"head.weight": weight, "head.bias": bias}
    if name == "static_nsn":  # DNS M_s = I: all ones
        initial.update({f"M_s[{i}]": torch.ones(9) for i in range(4)})
    if name == "finetune_whole":
        initial.update({f"backbone.{k}": v.detach() for k, v in method.backbone.named_parameters()})
    bf16 = _train_per_episode(method, name, seed, amp=True)
    checked = {k: v for k, v in bf16.items() if not k.startswith("backbone.")}  # BN scales: a few may stay put
    problems = _problems(checked, initial)
    problems += [f"{k} is {v.dtype}" for k, v in bf16.items() if k.startswith("backbone.") and v.dtype != torch.float32]
    assert not problems, f"{name} per-episode training under bf16 autocast: {'; '.join(problems)}"
    fp32 = _train_per_episode(method, name, seed, amp=False)
    drift = ((_flat(bf16) - _flat(fp32)).norm() / (_flat(fp32) - _flat(initial)).norm()).item()
    assert drift <= MAX_BF16_DRIFT, f"{name}: bf16 training is {drift:.3f} (of float32 training's move) from float32's"


def test_fit_linear_head_under_autocast_trains_the_current_weights():
    """Steps inside one autocast region see the weights of their step, not autocast's cached copy of the first."""
    g = torch.Generator().manual_seed(0)
    features, labels = torch.rand(10, 16, generator=g), torch.arange(5).repeat_interleave(2)
    heads = []
    for amp in (False, True):
        torch.manual_seed(1)
        head = nn.Linear(16, 5)
        with torch.autocast("cpu", dtype=BF16, enabled=amp):
            fit_linear_head(head, features.to(BF16) if amp else features, labels, epochs=100, **{
                k: CHEN[k] for k in ("batch_size", "lr", "momentum", "dampening", "weight_decay")})
        heads.append(head)
    ref, got = heads
    assert got.weight.dtype == torch.float32
    for a, b in ((got.weight, ref.weight), (got.bias, ref.bias)):
        assert (a - b).abs().max() <= 0.02 * b.abs().max(), ((a - b).abs().max(), b.abs().max())


@pytest.mark.parametrize("name", ["dynamic_nsn", "finetune"])
def test_batched_heads_train_in_float32_under_bf16_autocast(name, monkeypatch):
    """The frozen-backbone batched path (:meth:`evaluate_embedded` through ``fit_linear_heads``): float32 heads from
    the per-episode path's initial draws, trained on float32 features, logits close to the per-episode path's."""
    method = _method(name)
    module = sys.modules[type(method).__module__]
    real, calls = module.fit_linear_heads, []

    def spy(weight, bias, features, *args, **kwargs):
        trained = real(weight, bias, features, *args, **kwargs)
        calls.append(((weight, bias), trained))
        return trained

    monkeypatch.setattr(module, "fit_linear_heads", spy)
    episodes = [_episode(seed) for seed in range(2)]
    sx, sy, qx = (torch.stack(parts) for parts in zip(*episodes))
    seeds = [episode_seed(0, e) for e in range(len(episodes))]
    assert method.supports_batched_evaluation() and method.image_embedding() is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        got = method.evaluate_episodes(sx, sy, qx, seeds, WAYS)
        ref = FewShotMethod.evaluate_one_by_one(method, sx, sy, qx, seeds, WAYS)
    assert len(calls) == 1
    (w0, b0), (w, b) = calls[0]
    problems = []
    for e, seed in enumerate(seeds):
        weight, bias = _initial_head(method, seed)
        assert torch.equal(w0[e], weight.to(w0.dtype)) and torch.equal(b0[e], bias.to(b0.dtype)), \
            "the batched path's initial heads are not the per-episode path's draws"
        problems += [f"episode {e} {p}" for p in _problems({"weight": w[e], "bias": b[e]},
                                                           {"weight": weight, "bias": bias})]
    assert not problems, f"{name} batched heads under bf16 autocast: {'; '.join(problems)}"
    for e in range(len(seeds)):
        gap, tolerance = logits_gap(got[e], ref[e])
        assert gap <= tolerance, (e, gap, tolerance)


# ----------------------------------------------------------------------------- class counts without host syncs
def _bincount_means(features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    """The former ``class_means``: counts from ``torch.bincount`` (which reads the labels' min and max on the host)."""
    counts = torch.bincount(labels, minlength=ways).clamp_min(1).to(features.dtype)
    return FewShotMethod.class_sums(features, labels, ways) / counts.view(-1, *([1] * (features.dim() - 1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, BF16], ids=str)
@pytest.mark.parametrize("shape", [(25, 64), (12, 8, 3, 3)], ids=["vectors", "maps"])
def test_class_means_without_bincount_are_bit_identical(dtype, shape, monkeypatch):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(*shape, generator=g).to(dtype)
    labels = torch.randint(0, 5, (shape[0],), generator=g)
    ref = _bincount_means(features, labels, 7)  # ways 7: two classes without examples (zeros)
    monkeypatch.setattr(torch, "bincount", lambda *a, **k: pytest.fail("torch.bincount syncs a CUDA device"))
    got = FewShotMethod.class_means(features, labels, 7)
    assert got.dtype == ref.dtype and torch.equal(got, ref)


def test_validation_prototype_logits_without_bincount(monkeypatch):
    from types import SimpleNamespace

    from fewshot_nsl.backbones import cnn4
    from fewshot_nsl.validation import prototype_logits

    torch.manual_seed(0)
    net = cnn4(filters=8).eval()
    sy = torch.arange(5).repeat(3)[torch.randperm(15)]
    t = SimpleNamespace(support_x=torch.randn(15, 3, 16, 16), support_y=sy, query_x=torch.randn(10, 3, 16, 16))
    with torch.no_grad():
        s, q = net(t.support_x), net(t.query_x)
        ref = -torch.cdist(q, _bincount_means(s, sy, 5)).pow(2)
        monkeypatch.setattr(torch, "bincount", lambda *a, **k: pytest.fail("torch.bincount syncs a CUDA device"))
        assert torch.equal(prototype_logits(net, t), ref)
        sy.episode_ways = 5  # the materialised labels' count: ways without reading the labels
        monkeypatch.setattr(torch.Tensor, "max", lambda *a, **k: pytest.fail("max() syncs a CUDA device"))
        assert torch.equal(prototype_logits(net, t), ref)
