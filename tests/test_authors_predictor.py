"""The NSL authors' dynamic similarity predictor (``predictor: authors``, issue 26 item 4).

Source: ``github:wy1iu/NSL``, ``nsl_image_recog/experiments_cifar10/dynamic_dns/architecture.py``
(``_combined_conv``, ``_conv_layer``, ``_get_input_norm``, ``batch_norm``) and
``dynamic_uns/architecture.py`` (the same, without BN, widths 128 / 81). DNS: ``m1`` = 3x3 conv to
``hidden`` divided by the input patch norm only (eps 1e-4), BN, ReLU; ``m2`` = plain 3x3 conv to
``kk``, BN; ``M_s = I + m2``. UNS: ``m1`` without BN, ReLU, ``m2`` to ``kk * kk`` without BN.
Weights ``N(0, (init_scale * sqrt(2 / fan_in))^2)``, init scale 0.1 (``m1``) and 0.001 (``m2``), no
bias. Here checked against an unfold-based reference, by gradcheck, and in a CNN-4 dynamic NSN.
"""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from fewshot_nsl.backbones import cnn4
from fewshot_nsl.config import resolve_config
from fewshot_nsl.errors import ConfigError
from fewshot_nsl.nn import NSConv2d, make_conv_factory, ns_conv_reference
from fewshot_nsl.runner import build_method

DT = torch.float64
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
#: (stride, padding) of the NSConv2d layer under test; kernel 3.
LAYERS = [(1, 1), (2, 1), (1, 0)]


def _layer(structure: str, stride: int = 1, padding: int = 1, c_in: int = 3, hidden: int = 5, **extra) -> NSConv2d:
    torch.manual_seed(0)
    return NSConv2d(c_in, 4, 3, stride, padding, mode="dynamic", structure=structure, predictor="authors",
                    hidden=hidden, **extra).to(DT)  # fmt: skip


def _x(batch: int = 2, c_in: int = 3, size: int = 7) -> torch.Tensor:
    return torch.randn(batch, c_in, size, size, generator=torch.Generator().manual_seed(1), dtype=DT)


def _randomise_bn(layer: NSConv2d) -> None:
    """Non-trivial BN affine parameters, so the reference checks that they are applied."""
    g = torch.Generator().manual_seed(2)
    for bn in (m for m in layer.predictor.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        with torch.no_grad():
            bn.weight.copy_(0.5 + torch.rand(bn.weight.shape, generator=g, dtype=DT))
            bn.bias.copy_(0.3 * torch.randn(bn.bias.shape, generator=g, dtype=DT))


def _reference_patch_normalised_conv(x, w, stride, pads, eps):
    """``<w_o, X_l> / sqrt(||X_l||^2 + eps)`` on unfold patches (the filter is not normalised)."""
    b = x.shape[0]
    xp = F.pad(x, pads)
    patches = F.unfold(xp, w.shape[2:], stride=stride)  # (B, C*kk, L)
    ho = (xp.shape[2] - w.shape[2]) // stride + 1
    wo = (xp.shape[3] - w.shape[3]) // stride + 1
    num = torch.einsum("ok,bkl->bol", w.flatten(1), patches)
    return (num / torch.sqrt(patches.pow(2).sum(1, keepdim=True) + eps)).view(b, -1, ho, wo)


def _reference_bn(h, bn, training):
    """BatchNorm2d written out: batch statistics (biased variance) in training, running ones in eval."""
    if training:
        mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    return (h - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps) * bn.weight.view(
        1, -1, 1, 1
    ) + bn.bias.view(1, -1, 1, 1)


def _reference_residual(layer: NSConv2d, x: torch.Tensor, training: bool) -> torch.Tensor:
    """The authors' ``_combined_conv`` mask before ``+ I``, from unfold patches: ``(B, n_maps, Ho, Wo)``."""
    pred = layer.predictor
    w1, w2 = pred.core.conv1.weight, pred.core.conv2.weight
    h = _reference_patch_normalised_conv(x, w1, layer.stride[0], layer.pads, 1e-4)  # m1 on the layer's input
    if layer.structure == "dns":
        h = _reference_bn(h, pred.bn, training)
    h = torch.relu(h)
    r = F.conv2d(h, w2, None, 1, 1)  # m2: plain 3x3 'SAME' conv
    if layer.structure == "dns":
        r = _reference_bn(r, pred.bn_out, training)
    return r


# ----------------------------------------------------------------------------- reference
@pytest.mark.parametrize("structure", ["dns", "uns"])
@pytest.mark.parametrize("stride,padding", LAYERS)
def test_authors_predictor_matches_unfold_reference(structure, stride, padding):
    layer = _layer(structure, stride, padding)
    _randomise_bn(layer)
    with torch.no_grad():  # larger weights than the init, so that the residual is far from 0
        layer.predictor.core.conv1.weight.mul_(30.0)
        layer.predictor.core.conv2.weight.mul_(300.0)
    x = _x()
    for training in (True, False):
        layer.train(training)
        r = _reference_residual(layer, x, training)
        kk = layer.kk
        assert r.shape[1] == (kk if structure == "dns" else kk * kk)
        assert r.abs().max() > 0.05
        torch.testing.assert_close(layer.predictor(x), r, atol=1e-10, rtol=0)
        # M_s = I + mask (authors: `mask += 1` / `+= eye(9)`), applied by the efficient path
        b, n, ho, wo = r.shape
        eye = torch.ones(kk, dtype=DT) if structure == "dns" else torch.eye(kk, dtype=DT).flatten()
        m = (r + eye.view(1, -1, 1, 1)).flatten(2).transpose(1, 2)
        m = m if structure == "dns" else m.reshape(b, ho * wo, kk, kk)
        torch.testing.assert_close(layer.similarity(x), m, atol=1e-10, rtol=0)
        expected = ns_conv_reference(x, layer.weight, layer.bias, m, layer.stride, layer.padding, layer.dilation)
        torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("structure", ["dns", "uns"])
def test_authors_predictor_layers_and_initialisation(structure):
    c_in, hidden = 64, (64 if structure == "dns" else 128)
    layer = _layer(structure, c_in=c_in, hidden=hidden)
    pred = layer.predictor
    w1, w2 = pred.core.conv1.weight, pred.core.conv2.weight
    kk = layer.kk
    assert w1.shape == (hidden, c_in, 3, 3) and w2.shape == ((kk if structure == "dns" else kk * kk), hidden, 3, 3)
    assert pred.core.conv1.bias is None and pred.core.conv2.bias is None
    # tf.random_normal_initializer(stddev=sqrt(2 / (k*k*n_input)) * init_scale): a normal, not truncated
    for w, scale, fan_in in ((w1, 0.1, 9 * c_in), (w2, 0.001, 9 * hidden)):
        std = scale * math.sqrt(2.0 / fan_in)
        assert abs(w.mean().item()) < 0.05 * std
        assert w.std().item() == pytest.approx(std, rel=0.05)
        tail = (w.abs() > 2 * std).double().mean().item()  # 4.55% for a normal, 0 for a truncated one
        assert 0.03 < tail < 0.065
    bns = [m for m in pred.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if structure == "dns":  # BN after m1 and after m2, eps 1e-3, scale 1 and offset 0 (get_bias 1.0 / 0.0)
        assert [bn.num_features for bn in bns] == [hidden, kk]
        for bn in bns:
            assert bn.eps == 1e-3 and bn.affine and torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    else:  # dynamic_uns: _conv_layer(..., bn=False) for m1 and m2
        assert bns == []
    assert pred.gain is None  # no tanh gate: the authors' M_s = I + mask


def test_authors_dns_initial_residual_is_small_but_not_zero():
    """0.001-scaled m2 + BN eps 1e-3: the BN output is about conv / sqrt(1e-3), a small residual."""
    layer = _layer("dns", c_in=16, hidden=64).train()
    x = torch.randn(8, 16, 10, 10, generator=torch.Generator().manual_seed(4), dtype=DT)
    r = layer.predictor(x)
    assert 1e-3 < r.std().item() < 0.2


def test_authors_predictor_gate_is_an_option():
    layer = _layer("dns", zero_init_residual=True)
    assert layer.predictor.gain is not None
    x = _x()
    torch.testing.assert_close(layer.similarity(x), torch.ones_like(layer.similarity(x)))  # tanh(0) = 0


# ----------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("structure", ["dns", "uns"])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1)])
def test_authors_predictor_gradcheck(structure, stride, padding):
    layer = _layer(structure, stride, padding, c_in=2, hidden=3).train()
    _randomise_bn(layer)
    with torch.no_grad():
        layer.predictor.core.conv2.weight.mul_(300.0)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]
    x = _x(2, 2, 5).requires_grad_(True)

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    # UNS has 81 * 3 * 9 m2 weights: the fast (random-projection) mode keeps it to a second
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, fast_mode=structure == "uns")


# ----------------------------------------------------------------------------- in a network
@pytest.mark.parametrize("structure,sharing", [("dns", "disjoint"), ("uns", "disjoint"), ("dns", "shared")])
def test_cnn4_dynamic_nsn_with_authors_predictor_trains(structure, sharing):
    torch.manual_seed(0)
    factory = make_conv_factory("dynamic", structure=structure, predictor="authors", sharing=sharing, hidden=4,
                                common_width=4)  # fmt: skip
    net = cnn4(filters=6, conv_layer=factory)
    layers = [m for m in net.modules() if isinstance(m, NSConv2d)]
    assert len(layers) == 4 and all(m.predictor_kind == "authors" for m in layers)
    x = torch.randn(4, 3, 32, 32)
    features = net(x)
    assert features.shape[0] == 4 and torch.isfinite(features).all()
    head = torch.nn.Linear(features.shape[1], 3)
    F.cross_entropy(head(features), torch.tensor([0, 1, 2, 0])).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_dynamic_nsn_method_runs_with_authors_predictor():
    cfg = resolve_config({"method": "dynamic_nsn", "profile": "smoke", "dataset": "tiny", "image_size": 16,
                          "shots": 2, "backbone_options": {"filters": 8}, "device": "cpu",
                          "conv": {"predictor": "authors", "hidden": 4}})  # fmt: skip
    method = build_method(cfg).eval()
    layers = [m for m in method.modules() if isinstance(m, NSConv2d)]
    assert layers and all(m.predictor_kind == "authors" for m in layers)
    g = torch.Generator().manual_seed(0)
    sx, sy = torch.randn(10, 3, 16, 16, generator=g), torch.arange(5).repeat(2)
    with torch.no_grad():
        method.fit_support(sx, sy)
        logits = method(torch.randn(6, 3, 16, 16, generator=g))
    assert logits.shape == (6, 5) and torch.isfinite(logits).all()


def test_unknown_predictor_is_one_clear_error():
    with pytest.raises(ConfigError, match="authors"):
        make_conv_factory("dynamic", predictor="author")


# ----------------------------------------------------------------------------- the paper profile
def test_paper_profile_dynamic_nsn_uses_the_authors_predictor():
    cfg = resolve_config({"method": "dynamic_nsn", "profile": "paper", "shots": 5})
    assert cfg.conv["predictor"] == "authors" and cfg.conv["structure"] == "dns" and cfg.conv["hidden"] == 64
    assert cfg.conv["predictor_bn_eps"] == 1e-3 and cfg.conv.get("zero_init_residual", False) is False
    method = build_method(resolve_config({"method": "dynamic_nsn", "profile": "paper", "image_size": 32, "shots": 1}))
    layers = [m for m in method.modules() if isinstance(m, NSConv2d)]
    assert layers and all(m.predictor_kind == "authors" and m.predictor.gain is None for m in layers)
    assert all(m.predictor.bn_out is not None and m.predictor.core.conv1.out_channels == 64 for m in layers)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIG_DIR / "ablations").glob("*.yaml")))
def test_ablation_configs_still_build(name):
    method = "dynamic_nsn" if name.startswith("dyn") else "meta_static_nsn"
    path = CONFIG_DIR / "ablations" / f"{name}.yaml"
    assert yaml.safe_load(path.read_text())  # not empty
    cfg = resolve_config({"method": method, "shots": 5, "image_size": 16, "device": "cpu"}, str(path))
    assert build_method(cfg) is not None
