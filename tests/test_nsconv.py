"""Numerical tests of the neural-similarity layers (fewshot_nsl.nn)."""
from __future__ import annotations

import itertools
from typing import Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

from fewshot_nsl.backbones import CNN4
from fewshot_nsl.errors import ConfigError
from fewshot_nsl.nn import (
    NSConv2d,
    NSConvFactory,
    SphereConv2d,
    fold_all,
    make_conv_factory,
    ns_conv2d,
    ns_conv_reference,
    similarity_parameters,
    similarity_regularization,
    sphere_conv2d,
    wrap_convs_static,
)

DT = torch.float64
ATOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP start-up and barrier costs (restored afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

# (kernel_size, stride, padding, dilation)
CONFIGS = [
    (3, 1, 1, 1),
    (3, 2, 0, 1),
    (1, 1, 0, 1),
    (5, 1, 0, 2),
    ((2, 3), (2, 1), (1, 0), 1),
    (4, 1, "same", 1),
]
CONFIG_IDS = ["3x3p1", "3x3s2", "1x1", "5x5d2", "2x3s21", "4x4same"]


def _conv(cfg, cin: int = 3, cout: int = 4, bias: bool = True) -> nn.Conv2d:
    k, s, p, d = cfg
    return nn.Conv2d(cin, cout, k, s, p, d, bias=bias).to(DT)


def _x(batch: int = 2, cin: int = 3, h: int = 12, w: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, cin, h, w, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _randomise_static(layer: NSConv2d, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.m_s, layer.m_chol):
            if p is not None:
                p.copy_(p + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _brute_force(x, weight, bias, m, stride, padding):
    """Loop-level ``out[b,o,l] = sum_c sum_{p,q} W[o,c,p] M(l)[p,q] X_l[c,q]`` for m (B, L, kk, kk)."""
    b_, c_, h_, w_ = x.shape
    o_, _, kh, kw = weight.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    ho = (h_ + 2 * padding - kh) // stride + 1
    wo = (w_ + 2 * padding - kw) // stride + 1
    out = torch.zeros(b_, o_, ho, wo, dtype=x.dtype)
    wf = weight.flatten(2)
    for b, i, j in itertools.product(range(b_), range(ho), range(wo)):
        patch = xp[b, :, i * stride : i * stride + kh, j * stride : j * stride + kw].flatten(1)  # (C, kk)
        ms = m[b, i * wo + j]
        out[b, :, i, j] = torch.einsum("ocp,pq,cq->o", wf, ms, patch)
    return out + bias.view(1, -1, 1, 1)


# ----------------------------------------------------------------------------- reference sanity
def test_reference_matches_brute_force_loops():
    torch.manual_seed(0)
    x, w, b = _x(2, 2, 5, 4), torch.randn(3, 2, 3, 3, dtype=DT), torch.randn(3, dtype=DT)
    for stride, padding in [(1, 1), (2, 0)]:
        ho = (5 + 2 * padding - 3) // stride + 1
        wo = (4 + 2 * padding - 3) // stride + 1
        m = torch.randn(2, ho * wo, 9, 9, dtype=DT)
        expected = _brute_force(x, w, b, m, stride, padding)
        torch.testing.assert_close(ns_conv_reference(x, w, b, m, stride, padding), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(ns_conv2d(x, w, b, m, stride, padding), expected, atol=ATOL, rtol=0)
        diag = torch.diagonal(m, dim1=-2, dim2=-1)  # (B, L, kk): DNS is the diagonal
        torch.testing.assert_close(
            ns_conv_reference(x, w, b, diag, stride, padding),
            _brute_force(x, w, b, torch.diag_embed(diag), stride, padding),
            atol=ATOL,
            rtol=0,
        )


# ----------------------------------------------------------------------------- identity == conv
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("structure", ["dns", "uns"])
def test_static_identity_equals_conv(cfg, structure):
    conv, x = _conv(cfg), _x()
    expected = conv(x)
    for extra in ({}, {"psd": True}, {"learn_shape": True}):
        layer = NSConv2d.from_conv(conv, structure, **extra)
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(layer.fold()(x), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("structure", ["dns", "uns"])
@pytest.mark.parametrize("predictor", ["sphere", "cnn"])
def test_dynamic_zero_residual_equals_conv(cfg, structure, predictor):
    conv, x = _conv(cfg), _x()
    expected = conv(x)
    for side in ("auto", "input", "output"):
        layer = NSConv2d.from_conv(conv, structure, mode="dynamic", predictor=predictor, side=side).to(DT)
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
    factory = make_conv_factory("dynamic", structure=structure, predictor=predictor, sharing="shared")
    k, s, p, d = cfg
    layer = factory(3, 4, k, s, p, True, d).to(DT)
    with torch.no_grad():
        layer.weight.copy_(conv.weight)
        layer.bias.copy_(conv.bias)
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- random M vs reference
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("structure", ["dns", "uns"])
def test_static_random_matches_reference_and_fold(cfg, structure):
    conv, x = _conv(cfg), _x()
    for extra in ({}, {"psd": True}, {"learn_shape": True}):
        layer = NSConv2d.from_conv(conv, structure, copy=True, **extra)
        _randomise_static(layer)
        if layer.shape_r is not None:
            with torch.no_grad():
                layer.shape_r[::2] = 0.0  # mask out every other tap
        m = layer.similarity()
        assert m.shape == (layer.kk, layer.kk)
        if structure == "dns":
            assert torch.count_nonzero(m - torch.diag(torch.diagonal(m))) == 0
        expected = ns_conv_reference(x, layer.weight, layer.bias, m, layer.stride, layer.padding, layer.dilation)
        out = layer(x)
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(layer.fold()(x), out, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("structure", ["dns", "uns"])
@pytest.mark.parametrize("side", ["input", "output"])
def test_functional_sides_match_reference(cfg, structure, side):
    conv, x = _conv(cfg), _x()
    k, s, p, d = cfg
    ho, wo = conv(x).shape[-2:]
    kk = conv.weight.shape[2] * conv.weight.shape[3]
    g = torch.Generator().manual_seed(3)
    shape = (2, ho * wo, kk) if structure == "dns" else (2, ho * wo, kk, kk)
    m = torch.randn(shape, generator=g, dtype=DT)
    expected = ns_conv_reference(x, conv.weight, conv.bias, m, s, p, d)
    torch.testing.assert_close(ns_conv2d(x, conv.weight, conv.bias, m, s, p, d, side=side), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("structure", ["dns", "uns"])
@pytest.mark.parametrize("predictor", ["sphere", "cnn"])
def test_dynamic_matches_reference(cfg, structure, predictor):
    conv, x = _conv(cfg), _x()
    layer = NSConv2d.from_conv(conv, structure, mode="dynamic", predictor=predictor, zero_init_residual=False).to(DT)
    m = layer.similarity(x)
    ho, wo = conv(x).shape[-2:]
    kk = layer.kk
    assert m.shape == ((2, ho * wo, kk) if structure == "dns" else (2, ho * wo, kk, kk))
    identity = torch.ones(kk, dtype=DT) if structure == "dns" else torch.eye(kk, dtype=DT)
    residual = m - identity
    assert residual.abs().max() > 1e-3 and residual.abs().max() < 1  # non-trivial, bounded in (-1, 1)
    expected = ns_conv_reference(x, layer.weight, layer.bias, m, layer.stride, layer.padding, layer.dilation)
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


STRIDE_ONE = [(c, i) for c, i in zip(CONFIGS, CONFIG_IDS) if c[1] == 1]


@pytest.mark.parametrize("cfg", [c for c, _ in STRIDE_ONE], ids=[i for _, i in STRIDE_ONE])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30], ids=["one-position-blocks", "one-block"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_taps_side_matches_reference_forward_and_backward(cfg, chunk_bytes, layout, monkeypatch):
    """side='taps' (DNS, stride 1): forward and all three gradients equal the unfold reference's,
    for one-position and whole-batch blocks, and the output keeps the input's memory format."""
    import fewshot_nsl.nn.taps as taps

    monkeypatch.setattr(taps, "TAPS_CHUNK_BYTES", chunk_bytes)
    conv, x = _conv(cfg, cin=3, cout=5), _x(3, 3, 10, 9)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    k, s, p, d = cfg
    ho, wo = conv(x).shape[-2:]
    kk = conv.weight.shape[2] * conv.weight.shape[3]
    m = torch.randn(3, ho * wo, kk, generator=torch.Generator().manual_seed(3), dtype=DT)
    leaves = [t.detach().clone().requires_grad_() for t in (x, conv.weight, conv.bias, m)]
    refs = [t.detach().clone().requires_grad_() for t in (x, conv.weight, conv.bias, m)]
    out = ns_conv2d(*leaves, s, p, d, side="taps")
    expected = ns_conv_reference(*refs, s, p, d)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=DT)
    grads = torch.autograd.grad(out, leaves, upstream)
    expected_grads = torch.autograd.grad(expected, refs, upstream)
    for name, got, want in zip(("x", "weight", "bias", "m"), grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0, msg=lambda msg, n=name: f"d/d{n}: {msg}")


def test_taps_side_gradcheck_and_double_backward():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 4, 5, generator=g, dtype=DT, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=DT, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=DT, requires_grad=True)
    m = torch.randn(2, 20, 9, generator=g, dtype=DT, requires_grad=True)

    def fn(*args):
        return ns_conv2d(*args, stride=1, padding=1, side="taps")

    assert gradcheck(fn, (x, w, b, m))
    assert gradgradcheck(fn, (x, w, b, m), fast_mode=True)


def test_taps_side_is_auto_for_wide_dns_layers_and_refused_where_it_cannot_apply(monkeypatch):
    import fewshot_nsl.nn.ns_conv_ops as ns_conv_ops

    monkeypatch.setattr(ns_conv_ops, "CPU_FUSED_DNS", False)  # the taps rule (eager default: the fused input side, tests/test_nn_fused_paths.py)
    calls = []
    real = ns_conv_ops.taps_conv
    monkeypatch.setattr(ns_conv_ops, "taps_conv", lambda *a: calls.append(a[0].shape[1]) or real(*a))
    wide, narrow = ns_conv_ops.TAPS_MIN_CHANNELS, ns_conv_ops.TAPS_MIN_CHANNELS - 1
    for c_in in (wide, narrow):
        ns_conv2d(torch.randn(1, c_in, 20, 20), torch.randn(2, c_in, 3, 3), None, torch.ones(1, 400, 9), 1, 1)
    ns_conv2d(torch.randn(1, wide, 20, 20), torch.randn(2, wide, 3, 3), None, torch.ones(1, 100, 9), 2, 1)  # strided
    ns_conv2d(torch.randn(1, wide, 20, 20), torch.randn(2, wide, 3, 3), None, torch.ones(1, 400, 9, 9), 1, 1)  # UNS
    # 5x5 maps: 8 x 7 padded positions per 25 outputs, above TAPS_MAX_POSITION_RATIO
    ns_conv2d(torch.randn(1, wide, 5, 5), torch.randn(2, wide, 3, 3), None, torch.ones(1, 25, 9), 1, 1)
    assert calls == [wide]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # traced: kept (one block, no graph break)
    ns_conv2d(torch.randn(1, wide, 20, 20), torch.randn(2, wide, 3, 3), None, torch.ones(1, 400, 9), 1, 1)
    assert calls == [wide, wide]
    with pytest.raises(ConfigError, match="side='taps' needs a DNS similarity and stride 1"):
        ns_conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), None, torch.ones(1, 9, 9), 2, 1, side="taps")
    with pytest.raises(ConfigError, match="side='taps' needs structure='dns' and stride 1"):
        NSConv2d(2, 2, 3, padding=1, mode="dynamic", structure="uns", side="taps")  # refused when built, not at the first forward
    with pytest.raises(ConfigError, match="side must be one of"):
        ns_conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), None, torch.ones(1, 25, 9), 1, 1, side="tap")


def test_dynamic_forward_does_not_unfold(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("F.unfold called in the dynamic forward")

    monkeypatch.setattr(torch.nn.functional, "unfold", boom)
    for structure, side in [*itertools.product(["dns", "uns"], ["input", "output"]), ("dns", "taps")]:
        layer = NSConv2d(3, 4, 3, padding=1, mode="dynamic", structure=structure, side=side, zero_init_residual=False)
        layer(torch.randn(2, 3, 6, 6)).sum().backward()


def test_sphere_conv_is_cosine():
    x = _x(1, 2, 3, 3)
    w = torch.randn(4, 2, 3, 3, dtype=DT)
    out = sphere_conv2d(x, w, eps=0.0).flatten()
    expected = F.cosine_similarity(w.flatten(1), x.flatten().unsqueeze(0), dim=1)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    layer = SphereConv2d(2, 4, 3, padding=1).to(DT)
    y = layer(_x(2, 2, 5, 5))
    assert y.shape == (2, 4, 5, 5) and y.abs().max() < 1
    zero = sphere_conv2d(torch.zeros(1, 2, 3, 3, dtype=DT, requires_grad=True), w)
    zero.sum().backward()  # finite at an all-zero patch
    assert torch.isfinite(zero).all()


def _sphere_by_unfold(x, w, stride, pads, eps, scale=None):
    """Cosine conv from its definition: unfold the padded input, divide by both smoothed norms."""
    xp = F.pad(x, pads)
    patches = F.unfold(xp, w.shape[2:], stride=stride)  # (B, C*kk, L)
    wf = w.flatten(1)
    cos = torch.einsum("ok,bkl->bol", wf, patches)
    cos = cos / torch.sqrt(wf.square().sum(1) + eps).view(1, -1, 1) / torch.sqrt(patches.square().sum(1, keepdim=True) + eps)
    if scale is not None:
        cos = cos * scale.view(1, -1, 1)
    ho = (xp.shape[2] - w.shape[2]) // stride[0] + 1
    return cos.view(x.shape[0], w.shape[0], ho, -1)


SPHERE_CASES = [  # kernel, stride, (l, r, t, b)
    ((3, 3), (1, 1), (1, 1, 1, 1)),  # the predictors' conv2 (and conv1 of a padded 3x3 layer)
    ((3, 3), (1, 1), (0, 0, 0, 0)),
    ((3, 3), (2, 2), (1, 1, 1, 1)),  # conv1 of a strided layer
    ((2, 3), (1, 2), (0, 0, 2, 2)),
    ((3, 3), (1, 1), (1, 0, 2, 1)),  # asymmetric: the input itself is padded
    ((3, 3), (1, 1), (-1, -1, 0, 0)),  # cropping (conv1 of a layer with a 5-wide span)
    ((1, 1), (1, 1), (0, 0, 0, 0)),
]


@pytest.mark.parametrize("ksize,stride,pads", SPHERE_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_sphere_conv_matches_its_definition(ksize, stride, pads, channels_last):
    """The written-out :class:`_SphereConv` forward and backward equal the unfold definition,
    for symmetric, asymmetric and negative paddings, strides, and both memory formats."""
    x = _x(2, 3, 9, 8).requires_grad_()
    w = torch.randn(4, 3, *ksize, dtype=DT, generator=torch.Generator().manual_seed(3)).requires_grad_()
    scale = torch.tensor([0.5, -0.3, 0.0, 0.9], dtype=DT, requires_grad=True)
    xin = x.to(memory_format=torch.channels_last) if channels_last else x
    got = sphere_conv2d(xin, w, stride, pads, eps=1e-4, out_scale=scale)
    want = _sphere_by_unfold(x, w, stride, pads, 1e-4, scale)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)
    up = torch.randn(got.shape, dtype=DT, generator=torch.Generator().manual_seed(4))
    for a, b in zip(torch.autograd.grad(got, (x, w, scale), up), torch.autograd.grad(want, (x, w, scale), up)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_sphere_conv_gradcheck_and_double_backward():
    x = _x(1, 2, 5, 6).requires_grad_()
    w = torch.randn(3, 2, 3, 3, dtype=DT, generator=torch.Generator().manual_seed(5), requires_grad=True)
    for stride, pads in [((1, 1), (1, 1, 1, 1)), ((2, 1), (0, 0, 1, 1))]:
        fn = lambda a, b: sphere_conv2d(a, b, stride, pads)  # noqa: E731
        assert gradcheck(fn, (x, w))
        assert gradgradcheck(fn, (x, w))
    # only the filters need a gradient (the image going into the first layer's predictor)
    assert gradcheck(lambda b: sphere_conv2d(x.detach(), b, 1, 1), (w,))


def test_predictor_gain_is_folded_into_the_cosine_filters():
    """``second(h, scale)`` is the cosine conv times ``scale`` per map, values and gradients."""
    from fewshot_nsl.nn import SimilarityPredictor

    torch.manual_seed(0)
    pred = SimilarityPredictor(4, 9, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), hidden=5).to(DT)
    with torch.no_grad():
        pred.gain.copy_(torch.linspace(-1, 1, 9))
    x = _x(2, 4, 7, 7)
    got = pred(x)
    h = torch.relu(pred.bn(pred.core.first(x, pred.stride, pred.pads)))
    want = pred.core.conv2(h) * torch.tanh(pred.gain).view(1, -1, 1, 1)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    params = [pred.gain, pred.core.conv2.weight]
    for a, b in zip(torch.autograd.grad(got.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("ksize,stride", [((3, 3), (1, 1)), ((3, 3), (2, 2)), ((2, 3), (1, 2)), ((1, 1), (1, 1)), ((5, 4), (3, 1))])
def test_sphere_window_sums_equal_sum_pooling(ksize, stride):
    from fewshot_nsl.nn.functional import _window_sums

    sq = _x(2, 1, 11, 10).square().requires_grad_()
    got = _window_sums(sq, ksize, stride)
    want = F.avg_pool2d(sq, ksize, stride, 0, divisor_override=1)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    torch.testing.assert_close(torch.autograd.grad(got, sq, upstream)[0], torch.autograd.grad(want, sq, upstream)[0], atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- gradcheck
def _gradcheck_layer(layer: NSConv2d, x: torch.Tensor, skip: Tuple[str, ...] = ()) -> bool:
    names = [n for n, p in layer.named_parameters() if p.requires_grad and n not in skip]
    params: Dict[str, torch.Tensor] = dict(layer.named_parameters())
    tensors = [params[n].detach().clone().requires_grad_() for n in names]

    def fn(x_: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, {**params, **dict(zip(names, ps))}, (x_,))

    return gradcheck(fn, (x.requires_grad_(), *tensors), eps=1e-6, atol=1e-6, fast_mode=True)


GRAD_CASES = [
    ("static", "dns", {}),
    ("static", "uns", {}),
    ("static", "dns", {"psd": True}),
    ("static", "uns", {"psd": True}),
    ("static", "uns", {"learn_shape": True}),
    ("dynamic", "dns", {}),
    ("dynamic", "uns", {}),
    ("dynamic", "dns", {"predictor": "cnn"}),
    ("dynamic", "uns", {"learn_shape": True}),
]


@pytest.mark.parametrize("mode,structure,extra", GRAD_CASES, ids=[f"{m}-{s}-{'-'.join(e) or 'base'}" for m, s, e in GRAD_CASES])
def test_gradcheck_layer(mode, structure, extra):
    torch.manual_seed(0)
    if mode == "dynamic":
        extra = {"hidden": 2, "zero_init_residual": False, **extra}
    layer = NSConv2d(2, 2, 3, padding=1, mode=mode, structure=structure, **extra).to(DT)
    if mode == "static":
        _randomise_static(layer)
    # D_r's straight-through gradient is not its true (zero) derivative: checked in test_learn_shape_*.
    assert _gradcheck_layer(layer, _x(2, 2, 5, 5), skip=("shape_r",))


def test_gradcheck_shared_predictor():
    torch.manual_seed(0)
    factory = make_conv_factory("dynamic", structure="dns", sharing="shared", hidden=2, common_width=2, zero_init_residual=False)
    layer = factory(2, 2, 3, padding=1).to(DT)
    assert _gradcheck_layer(layer, _x(2, 2, 5, 5))


@pytest.mark.parametrize("structure", ["dns", "uns"])
@pytest.mark.parametrize("side", ["input", "output"])
def test_gradcheck_functional(structure, side):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 4, 4, generator=g, dtype=DT, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, generator=g, dtype=DT, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=DT, requires_grad=True)
    shape = (2, 4, 9) if structure == "dns" else (2, 4, 9, 9)
    m = torch.randn(shape, generator=g, dtype=DT, requires_grad=True)

    def fn(*args):
        return ns_conv2d(*args, stride=2, padding=1, side=side)

    # Full Jacobians for DNS; UNS (9x more similarity entries) with the random-projection check.
    assert gradcheck(fn, (x, w, b, m), fast_mode=structure == "uns")
    # Second order (e.g. MAML through a dynamic layer): the hand-written backward is differentiable.
    assert gradgradcheck(fn, (x, w, b, m), fast_mode=True)


# ----------------------------------------------------------------------------- kernel shape
def test_learn_shape_straight_through_and_binary():
    torch.manual_seed(0)
    x = _x(2, 2, 6, 6)
    for mode, structure in [("static", "uns"), ("static", "dns"), ("dynamic", "dns"), ("dynamic", "uns")]:
        layer = NSConv2d(2, 3, 3, padding=1, mode=mode, structure=structure, learn_shape=True, zero_init_residual=False).to(DT)
        with torch.no_grad():
            layer.shape_r.copy_(torch.linspace(0.0, 1.0, 9, dtype=DT))
        d = layer.shape_mask()
        assert set(d.detach().unique().tolist()) <= {0.0, 1.0}
        torch.testing.assert_close(d.detach(), (layer.shape_r > 0.5).to(DT))
        layer(x).square().sum().backward()
        grad_r = layer.shape_r.grad.clone()
        assert grad_r.abs().sum() > 0
        # Straight-through: dL/dD_r equals dL/dD for a continuous D placed at the same value.
        layer.zero_grad()
        d_cont = d.detach().clone().requires_grad_()
        layer.shape_mask = lambda: d_cont  # instance-level override (test only)
        layer(x).square().sum().backward()
        del layer.shape_mask
        torch.testing.assert_close(grad_r, d_cont.grad, atol=1e-9, rtol=1e-9)


def test_learn_shape_masks_kernel_taps():
    conv, x = _conv((3, 1, 1, 1)), _x()
    layer = NSConv2d.from_conv(conv, "uns", copy=True, learn_shape=True)
    with torch.no_grad():
        layer.shape_r[4] = 0.0  # drop the centre tap
    masked = nn.Conv2d(3, 4, 3, padding=1).to(DT)
    with torch.no_grad():
        masked.weight.copy_(conv.weight)
        masked.weight[:, :, 1, 1] = 0
        masked.bias.copy_(conv.bias)
    torch.testing.assert_close(layer(x), masked(x), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- sharing
def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_shared_predictor_counted_once_and_smaller():
    disjoint = CNN4(filters=8, conv_layer=make_conv_factory("dynamic", structure="dns"))
    factory = make_conv_factory("dynamic", structure="dns", sharing="shared")
    shared = CNN4(filters=8, conv_layer=factory)
    layers = [m for m in shared.modules() if isinstance(m, NSConv2d)]
    cores = {id(layer.predictor.core) for layer in layers}
    assert len(cores) == 1 and len(factory.shared_predictors) == 1
    core = layers[0].predictor.core
    # model.parameters() dedups: the core's tensors are listed once although 4 layers register it.
    unique = {id(p): p for m in shared.modules() for p in m.parameters(recurse=False)}
    assert _n_params(shared) == sum(p.numel() for p in unique.values())
    listed = list(shared.parameters())
    assert all(sum(1 for q in listed if q is p) == 1 for p in core.parameters())
    assert _n_params(shared) < _n_params(disjoint)
    # state_dict round trip keeps sharing
    clone = CNN4(filters=8, conv_layer=make_conv_factory("dynamic", structure="dns", sharing="shared"))
    clone.load_state_dict(shared.state_dict())
    x = torch.randn(2, 3, 32, 32)
    shared.eval(), clone.eval()
    torch.testing.assert_close(clone(x), shared(x))


# ----------------------------------------------------------------------------- backbones
FACTORIES = [
    ("plain", {}),
    ("static", {"structure": "dns"}),
    ("static", {"structure": "uns", "psd": True}),
    ("static", {"structure": "uns", "learn_shape": True}),
    ("dynamic", {"structure": "dns"}),
    ("dynamic", {"structure": "uns"}),
    ("dynamic", {"structure": "dns", "predictor": "cnn"}),
    ("dynamic", {"structure": "dns", "sharing": "shared"}),
    ("dynamic", {"structure": "uns", "sharing": "shared", "learn_shape": True}),
]


@pytest.mark.parametrize("kind,options", FACTORIES, ids=[f"{k}-{'-'.join(f'{a}={b}' for a, b in o.items())}" for k, o in FACTORIES])
def test_cnn4_with_factory(kind, options):
    torch.manual_seed(0)
    if kind == "dynamic":
        options = {**options, "zero_init_residual": False}
    net = CNN4(filters=8, conv_layer=make_conv_factory(kind, **options))
    x = torch.randn(3, 3, 16, 16)
    out = net(x)
    assert out.shape == (3, 8) and torch.isfinite(out).all()
    (out.square().mean() + similarity_regularization(net, l1=1e-3, l2=1e-3)).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    net.eval()
    assert torch.isfinite(net(x)).all()


def test_cnn4_dynamic_default_starts_as_cnn_and_learns():
    torch.manual_seed(0)
    plain = CNN4(filters=8)
    net = CNN4(filters=8, conv_layer=make_conv_factory("dynamic", structure="dns"))
    net.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(net(x), plain(x))
    net(x).square().mean().backward()
    gains = [m.predictor.gain for m in net.modules() if isinstance(m, NSConv2d)]
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gains)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    net(x).square().mean().backward()
    core_grads = [m.predictor.core.conv1.weight.grad for m in net.modules() if isinstance(m, NSConv2d)]
    assert all(g is not None and g.abs().sum() > 0 for g in core_grads)


# ----------------------------------------------------------------------------- helpers
def test_wrap_fold_and_similarity_parameters():
    torch.manual_seed(0)
    net = CNN4(filters=8).to(DT).eval()
    x = torch.randn(2, 3, 32, 32, dtype=DT)
    expected = net(x)
    wrapped = wrap_convs_static(net, structure="uns")
    layers = [m for m in wrapped.modules() if isinstance(m, NSConv2d)]
    assert len(layers) == 4 and not any(isinstance(m, nn.Conv2d) for m in wrapped.modules())
    torch.testing.assert_close(wrapped(x), expected, atol=ATOL, rtol=0)
    params = similarity_parameters(wrapped)
    assert len(params) == 4 and all(p.shape == (9, 9) for p in params)
    reg = similarity_regularization(wrapped, l1=1.0, l2=1.0)
    torch.testing.assert_close(reg, torch.tensor(4 * (9 + 4.5), dtype=DT))
    torch.testing.assert_close(similarity_regularization(wrapped, l1=1.0, centered=True), torch.tensor(0.0, dtype=DT))
    for layer in layers:
        _randomise_static(layer)
    changed = wrapped(x)
    folded = fold_all(wrapped)
    assert not any(isinstance(m, NSConv2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), changed, atol=ATOL, rtol=0)

    shaped = wrap_convs_static(CNN4(filters=8), structure="dns", learn_shape=True, psd=True)
    names = {n.rsplit(".", 1)[-1] for n, p in shaped.named_parameters() if any(p is q for q in similarity_parameters(shaped))}
    assert names == {"m_chol", "shape_r"}
    dynamic = CNN4(filters=8, conv_layer=make_conv_factory("dynamic", predictor="cnn", sharing="shared"))
    assert similarity_parameters(dynamic) == []
    n_convs = sum(isinstance(m, nn.Conv2d) for m in dynamic.modules())
    wrap_convs_static(dynamic)  # predictor convs and adapters stay plain convs
    assert sum(isinstance(m, nn.Conv2d) for m in dynamic.modules()) == n_convs
    once = wrap_convs_static(CNN4(filters=8))
    before = [id(p) for p in similarity_parameters(once)]
    assert [id(p) for p in similarity_parameters(wrap_convs_static(once))] == before  # wrapping twice changes nothing


def test_penalties():
    layer = NSConv2d(2, 2, 3, structure="uns")
    assert layer.l1_penalty().item() == 9 and layer.l2_penalty().item() == 4.5
    assert layer.l1_penalty(centered=True).item() == 0
    dyn = NSConv2d(2, 2, 3, mode="dynamic")
    assert dyn.l1_penalty().item() == 0 and dyn.l2_penalty().item() == 0


def test_config_errors():
    with pytest.raises(ConfigError, match="accepted: structure, learn_shape, shape_alpha, psd"):
        make_conv_factory("static", structur="dns")
    with pytest.raises(ConfigError, match="accepted: plain, static, dynamic"):
        make_conv_factory("spherical")
    with pytest.raises(ConfigError, match=r"\(none\)"):
        make_conv_factory("plain", structure="dns")
    with pytest.raises(ConfigError, match="structure"):
        make_conv_factory("dynamic", structure="full")
    with pytest.raises(ConfigError, match="psd"):
        NSConv2d(2, 2, 3, mode="dynamic", psd=True)
    with pytest.raises(ConfigError, match="shared_predictor"):
        NSConv2d(2, 2, 3, mode="dynamic", sharing="shared")
    with pytest.raises(ConfigError, match="fold"):
        NSConv2d(2, 2, 3, mode="dynamic").fold()
    with pytest.raises(ConfigError, match="groups"):
        NSConv2d.from_conv(nn.Conv2d(2, 2, 3, groups=2))
    for kind in ("static", "dynamic"):
        msg = ""
        try:
            make_conv_factory(kind, bogus=1)
        except ConfigError as err:
            msg = str(err)
        assert "\n" not in msg and "bogus" in msg
    assert make_conv_factory() is nn.Conv2d
    assert isinstance(make_conv_factory("dynamic"), NSConvFactory)


def test_float32_and_module_dtype_device_follow():
    layer = NSConv2d(3, 4, 3, padding=1, mode="dynamic", structure="uns")
    out = layer(torch.randn(2, 3, 8, 8))
    assert out.dtype == torch.float32 and out.shape == (2, 4, 8, 8)
    layer = layer.to(DT)
    assert layer(_x(2, 3, 8, 8)).dtype == DT


def test_channels_last_input():
    conv, x = _conv((3, 1, 1, 1)), _x(2, 3, 8, 8)
    xcl = x.contiguous(memory_format=torch.channels_last)
    for structure, side in [*itertools.product(["dns", "uns"], ["input", "output"]), ("dns", "taps")]:
        layer = NSConv2d.from_conv(conv, structure, mode="dynamic", side=side, zero_init_residual=False).to(DT)
        out = layer(xcl)
        torch.testing.assert_close(out, layer(x), atol=ATOL, rtol=0)
        assert out.is_contiguous(memory_format=torch.channels_last), (structure, side)  # as conv2d: format in = format out
