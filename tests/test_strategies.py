"""The three NSL few-shot strategies (paper Sec. 7.2): static_nsn, dynamic_nsn, meta_static_nsn.

Numerical tests of the layers themselves are in test_nsconv.py; every registered method also
goes through test_method_smoke.py.
"""

import pandas as pd
import pytest
import torch
from torch import nn

from fewshot_nsl.backbones import cnn4
from fewshot_nsl.config import resolve_config
from fewshot_nsl.errors import ConfigError
from fewshot_nsl.nn import NSConv2d, make_conv_factory, similarity_parameters
from fewshot_nsl.registry import create_method
from fewshot_nsl.runner import build_method, conv_spec_of, run
from fewshot_nsl.training import pretrain_key

from conftest import synthetic_episode  # noqa: E402

SIZE = 16


def episode(ways=5, shots=2, queries=3, seed=0):
    return synthetic_episode(ways, shots, queries, seed, SIZE)


def make(name, conv_layer=None, **options):
    torch.manual_seed(0)
    return create_method(name, backbone=cnn4(filters=8, conv_layer=conv_layer), image_size=SIZE, **options)


def snapshot(module):
    """Every parameter and buffer, cloned."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, before):
    after = module.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def cfg_for(method, **extra):
    cli = {"method": method, "profile": "smoke", "dataset": "tiny", "image_size": SIZE, "ways": 5, "shots": 2,
           "backbone_options": {"filters": 8}, "device": "cpu"}
    cli.update(extra)
    return resolve_config(cli)


# ----------------------------------------------------------------------------- meta_static_nsn
def meta(**options):
    method = make("meta_static_nsn", **options)
    method.after_pretrain()  # as the harness does once the pretrained weights are loaded
    return method


@pytest.mark.parametrize("adapt_head", [False, True])
def test_meta_inner_loop_changes_only_similarity_and_head(adapt_head):
    method = meta(inner_steps_test=3, adapt_head=adapt_head).eval()
    assert {n for n, p in method.named_parameters() if p.requires_grad} == (
        {f"backbone.blocks.{i}.0.m_s" for i in range(4)} | {"head.weight", "head.bias"}
    )  # the head is meta-learned in both cases; adapt_head decides whether the inner loop moves it
    before = snapshot(method)
    sx, sy, qx, _ = episode()
    with torch.no_grad():  # as the harness calls it
        fnet, fast = method.adapt(sx, sy, 3, track_higher_grads=False)
    names = [n for n, _ in method.network().named_parameters()]
    initial = dict(method.network().named_parameters())
    assert len(names) == len(fast)
    for name, p in zip(names, fast):
        adapted = name.endswith("m_s") or (adapt_head and name.startswith("1."))  # "1." is the head in network()
        assert torch.equal(p, initial[name]) != adapted, name
    assert_unchanged(method, before)  # initial M_s, head, W and BN statistics are all bit-identical
    with torch.no_grad():
        method.fit_support(sx, sy)
        logits = method(qx)
    assert logits.shape == (15, 5) and torch.isfinite(logits).all() and not logits.requires_grad
    assert_unchanged(method, before)


def test_meta_batch_norm_batch_statistics_vs_running():
    sx, sy, qx, _ = episode()
    running, batch = meta(batch_norm="running").eval(), meta(batch_norm="batch").eval()
    bns = [m for m in batch.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(bn.running_mean is None and not bn.track_running_stats for bn in bns)
    assert all(m.running_mean is not None for m in running.modules() if isinstance(m, nn.BatchNorm2d))
    # batch statistics: a query's logits depend on the other queries of the batch; running: they do not
    with torch.no_grad():
        for method, depends in ((running, False), (batch, True)):
            method.fit_support(sx, sy)
            alone, together = method(qx[:1]), method(qx)[:1]
            assert torch.allclose(alone, together, atol=1e-5) != depends
    with pytest.raises(ConfigError, match="batch_norm must be one of batch, running"):
        meta(batch_norm="frozen")


def test_meta_cosine_head():
    method = meta(head="cosine", cosine_scale=3.0, adapt_head=True)
    assert type(method.head).__name__ == "CosineHead"
    assert {n for n, p in method.named_parameters() if p.requires_grad and n.startswith("head")} == {"head.weight",
                                                                                                "head.norm"}
    z = torch.randn(6, method.head.weight.shape[1])
    logits = method.head(z)
    bound = 3.0 * float(method.head.norm.detach().abs().max())
    assert logits.shape == (6, 5) and logits.abs().max() <= bound + 1e-5  # scale * g_c * cosine
    assert torch.allclose(method.head(2.5 * z), logits, atol=1e-5)  # invariant to the feature norm
    # Chen et al.'s distLinear: a bias-free Linear under WeightNorm(dim=0) applied to x / (|x| + 1e-5), times scale
    chen = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(z.shape[1], 5, bias=False), dim=0)
    with torch.no_grad():
        chen.parametrizations.weight.original1.copy_(method.head.weight)
        chen.parametrizations.weight.original0.copy_(method.head.norm[:, None] * 1.7)
        method.head.norm.mul_(1.7)
    expected = 3.0 * chen(z / (z.norm(dim=1, keepdim=True) + 1e-5))
    torch.testing.assert_close(method.head(z), expected, rtol=1e-5, atol=1e-6)
    method.train().loss(*episode()).backward()
    assert method.head.weight.grad is not None and method.head.weight.grad.abs().sum() > 0
    assert method.head.norm.grad is not None and method.head.norm.grad.abs().sum() > 0
    plain = meta(head="cosine", cosine_class_norm=False)
    assert plain.head.norm is None and plain.head(z).abs().max() <= 2.0 + 1e-5
    with pytest.raises(ConfigError, match="head must be one of linear, cosine"):
        meta(head="mlp")


def test_meta_outer_gradients_reach_initial_similarity_first_and_second_order():
    grads = {}
    for first_order in (False, True):
        method = meta(first_order=first_order, inner_steps=2).train()
        bns = [m for m in method.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and not any(bn.training for bn in bns)  # BN frozen even in train mode
        method.loss(*episode()).backward()
        sims = similarity_parameters(method.backbone)
        assert len(sims) == 4
        for p in sims + list(method.head.parameters()):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
        for name, p in method.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, name
        grads[first_order] = torch.cat([p.grad.flatten() for p in sims])
    assert not torch.allclose(grads[False], grads[True], rtol=1e-3, atol=1e-7)
    assert torch.nn.functional.cosine_similarity(grads[False], grads[True], dim=0) > 0.5


def test_meta_checks_ways_and_order_of_calls():
    method = make("meta_static_nsn")
    with pytest.raises(RuntimeError, match="after_pretrain"):
        method.fit_support(*episode()[:2])
    method.after_pretrain()
    with pytest.raises(ConfigError, match="5-way head but the episode has 7 ways"):
        method.fit_support(*episode(ways=7)[:2])
    with torch.no_grad():
        method.eval().fit_support(*episode(ways=3)[:2])
        assert method(episode(ways=3)[2]).shape == (9, 3)


def test_meta_uns_carries_the_authors_l2():
    method = meta(structure="uns")
    assert method.similarity_l2 == 5e-3
    reg = method.regularization()  # 0.5 * 5e-3 * sum ||I_9||^2 over 4 layers
    assert reg.requires_grad and reg.item() == pytest.approx(0.5 * 5e-3 * 9 * 4)
    assert meta().regularization().item() == 0.0


# ----------------------------------------------------------------------------- static_nsn
def test_static_fit_support_does_not_leak_into_the_method():
    method = make("static_nsn", epochs=3).eval()
    before = snapshot(method)
    sx, sy, qx, _ = episode()
    with torch.no_grad():
        method.fit_support(sx, sy)
        logits = method(qx)
    assert logits.shape == (15, 5) and torch.isfinite(logits).all()
    assert_unchanged(method, before)
    assert not any(isinstance(m, NSConv2d) for m in method.modules())  # wrapping happens on the episode copy


def test_static_adaptation_moves_similarity_only():
    method = make("static_nsn", epochs=3, structure="uns").eval()
    assert method.similarity_l2 == 5e-3  # the authors' L2 on static UNS M_s
    sx, sy, _, _ = episode()
    with torch.no_grad():
        net, head = method.adapt(sx, sy)
    sims = similarity_parameters(net)
    assert len(sims) == 4
    for p in sims:
        assert p.shape == (9, 9)
        assert (p - torch.eye(9)).abs().max() > 1e-4, "M_s did not move away from I"
    pretrained = method.backbone.state_dict()
    for k, v in net.state_dict().items():  # W, BN affine and BN statistics as pretrained
        if not k.endswith("m_s"):
            assert torch.equal(v, pretrained[k]), k


@pytest.mark.parametrize("structure", ["dns", "uns"])
def test_static_folded_query_forward_equals_unfolded(structure):
    sx, sy, qx, _ = episode()
    logits, nets = {}, {}
    for fold in (True, False):
        method = make("static_nsn", epochs=4, batch_size=4, structure=structure, fold=fold).eval()
        torch.manual_seed(7)  # same shuffling of the support set
        with torch.no_grad():
            method.fit_support(sx, sy)
            logits[fold] = method(qx)
        nets[fold] = method._episode[0]
    assert not any(isinstance(m, NSConv2d) for m in nets[True].modules())
    assert sum(isinstance(m, NSConv2d) for m in nets[False].modules()) == 4
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


def test_static_refuses_an_nsn_backbone():
    with pytest.raises(ConfigError, match="drop the 'conv:' setting"):
        make("static_nsn", conv_layer=make_conv_factory("static"))


# ----------------------------------------------------------------------------- dynamic_nsn
def dynamic_layers(method):
    return [m for m in method.backbone.modules() if isinstance(m, NSConv2d) and m.mode == "dynamic"]


def test_dynamic_backbone_is_dynamic_and_frozen_at_test():
    torch.manual_seed(0)
    method = build_method(cfg_for("dynamic_nsn")).eval()
    layers = dynamic_layers(method)
    assert len(layers) == 4 and all(l.structure == "dns" and l.predictor.adapter is None for l in layers)
    before = snapshot(method)
    sx, sy, qx, _ = episode()
    with torch.no_grad():
        method.fit_support(sx, sy)
        logits = method(qx)
    assert logits.shape == (15, 5) and torch.isfinite(logits).all()
    assert_unchanged(method, before)


@pytest.mark.parametrize("conv", [{"structure": "uns"}, {"sharing": "shared"}, {"predictor": "cnn"}])
def test_dynamic_conv_overrides_run(conv):
    torch.manual_seed(0)
    cfg = cfg_for("dynamic_nsn", conv=conv)
    assert conv_spec_of(cfg)["kind"] == "dynamic"
    method = build_method(cfg).eval()
    layers = dynamic_layers(method)
    assert len(layers) == 4
    if "structure" in conv:
        assert all(l.structure == "uns" for l in layers)
    if "sharing" in conv:
        cores = {id(l.predictor.core) for l in layers}
        assert len(cores) == 1 and all(l.predictor.adapter is not None for l in layers)
    if "predictor" in conv:
        assert all(l.predictor.core.kind == "cnn" for l in layers)
    sx, sy, qx, _ = episode()
    with torch.no_grad():
        method.fit_support(sx, sy)
        assert torch.isfinite(method(qx)).all()


def test_dynamic_refuses_a_plain_backbone():
    with pytest.raises(ConfigError, match="dynamic NSConv2d"):
        build_method(cfg_for("dynamic_nsn", conv={"kind": "plain"}))


def test_pretraining_is_shared_with_the_baselines_and_distinct_for_dynamic(tiny_store):
    keys = {m: pretrain_key(cfg_for(m), tiny_store, conv_spec_of(cfg_for(m)))
            for m in ("static_nsn", "meta_static_nsn", "finetune", "nearest_neighbor", "dynamic_nsn")}
    assert len({keys[m] for m in ("static_nsn", "meta_static_nsn", "finetune", "nearest_neighbor")}) == 1
    assert keys["dynamic_nsn"] != keys["static_nsn"]


# ----------------------------------------------------------------------------- end to end
def e2e(tmp_path, method, **cli):
    cfg = resolve_config({"method": method, "profile": "smoke", "ways": 5, "device": "cpu",
                          "results_dir": str(tmp_path / "results"), **cli})
    row = run(cfg, progress=False, log=lambda *a: None)
    df = pd.read_csv(tmp_path / "results" / "leaderboard.csv")
    assert len(df) == 1 and df.loc[0, "method"] == method
    assert row["episodes_failed"] == 0 and 0.0 <= row["accuracy"] <= 100.0
    return row, df


@pytest.mark.parametrize("method", ["static_nsn", "dynamic_nsn", "meta_static_nsn"])
def test_end_to_end_on_glyphs_smoke(tmp_path, method):
    # 8 pretraining steps on glyphs give chance-level features: this checks the rows, not the accuracy.
    row, df = e2e(tmp_path, method, dataset="glyphs", shots=1, dataset_options={"images_per_class": 12},
                  eval={"episodes": 4, "queries": 5})  # the session's hermetic cache: one store, one plain pretraining
    assert row["episodes"] == 4
    assert df.loc[0, "dataset"] == "glyphs" and bool(df.loc[0, "synthetic"])


@pytest.mark.parametrize("method, options", [
    ("static_nsn", {}),
    ("dynamic_nsn", {}),
    # smoke's 4 meta-steps leave the meta-learned head near its random init, which M_s alone (the default,
    # Eq. 7) cannot make up for; with the head adapted too (10 steps, lr 0.5) this checks the pipeline.
    ("meta_static_nsn", {"inner_steps_test": 10, "inner_lr": 0.5, "adapt_head": True}),
])
def test_end_to_end_above_chance_on_tiny(tmp_path, method, options):
    row, _ = e2e(tmp_path, method, dataset="tiny", shots=2, image_size=16, method_options=options,
                 eval={"episodes": 12, "queries": 5})
    assert row["episodes"] == 12
    assert row["accuracy"] > 40.0  # chance is 20%
