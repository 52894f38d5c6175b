"""The fused CPU application of a dynamic DNS similarity (issue 29): ``side="input"`` (and ``"auto"``) on CPU, eager,
runs :func:`fewshot_nsl.nn.sides.dns_input_side_cpu`: one ``mul`` of a strided tap view and one oneDNN convolution
per chunk of images (:class:`~fewshot_nsl.nn.sides._MixedTapsConv`; with fewer than ``MIXED_CONV_MIN_CHANNELS``
inputs :class:`~fewshot_nsl.nn.sides._MixedTapsPointwise`). Equal to the unfold reference in float64, forward and
every gradient, for every geometry, chunking, memory format and both Functions; double backward; autocast."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import fewshot_nsl.nn.ns_conv_ops as ns_conv_ops
import fewshot_nsl.nn.sides as sides
from fewshot_nsl.nn import NSConv2d, ns_conv2d, ns_conv_reference
from fewshot_nsl.nn.geometry import _pair, conv_output_size, resolve_padding

DT = torch.float64
C_IN = sides.MIXED_CONV_MIN_CHANNELS  # the narrowest layer that takes _MixedTapsConv
NARROW = 3  # an RGB stem: _MixedTapsPointwise

# (kernel_size, stride, padding, dilation)
CONFIGS = [(3, 1, 1, 1), (3, 2, 0, 1), (1, 1, 0, 1), (5, 1, 0, 2), ((2, 3), (2, 1), (1, 0), 1), (4, 1, "same", 1), (3, 1, 0, 1)]
IDS = ["3x3p1", "3x3s2", "1x1", "5x5d2", "2x3s21", "4x4same", "3x3valid"]


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _case(cfg, batch=3, c_in=C_IN, c_out=5, hw=(10, 9), seed=0):
    """``(x, weight, bias, m)`` in float64 for a layer of geometry ``cfg``, and the output size."""
    k, s, p, d = cfg
    ksize, strd, dil = _pair(k, "k"), _pair(s, "s"), _pair(d, "d")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, *hw, generator=g, dtype=DT)
    w = torch.randn(c_out, c_in, *ksize, generator=g, dtype=DT)
    b = torch.randn(c_out, generator=g, dtype=DT)
    ho, wo = conv_output_size(hw, ksize, strd, resolve_padding(p, ksize, dil, strd), dil)
    m = torch.randn(batch, ho * wo, ksize[0] * ksize[1], generator=g, dtype=DT)
    return x, w, b, m


def _spy(monkeypatch):
    calls = []
    real = ns_conv_ops.dns_input_side_cpu
    monkeypatch.setattr(ns_conv_ops, "dns_input_side_cpu", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("chunk_bytes", [1, 3000, 1 << 30], ids=["one-image-chunks", "two-image-chunks", "one-chunk"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("c_in,image_min", [(C_IN, 0), (C_IN, 1 << 30), (NARROW, 0)], ids=["image", "rows", "pointwise"])
def test_fused_input_side_matches_reference(cfg, chunk_bytes, layout, with_bias, c_in, image_min, monkeypatch):
    """Forward and the gradients of x, weight, bias and m equal the unfold reference's; the output keeps the
    input's memory format; the fused path (the Function for the layer's width) is the one that ran. Wide
    layers with the mixed taps as an image (strided conv) and as rows (1x1 conv)."""
    monkeypatch.setattr(sides, "MIXED_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(sides, "MIXED_IMAGE_MIN_POSITIONS", image_min)
    calls = _spy(monkeypatch)
    ran = []
    for name in ("_MixedTapsConv", "_MixedTapsPointwise"):
        fn = getattr(sides, name)
        monkeypatch.setattr(fn, "apply", (lambda real, n: lambda *a: ran.append(n) or real(*a))(fn.apply, name))
    x, w, b, m = _case(cfg, c_in=c_in)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if not with_bias:
        b = None
    _, s, p, d = cfg
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, m)]
    refs = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, m)]
    out = ns_conv2d(*leaves, s, p, d, side="input")
    want = ns_conv_reference(*refs, s, p, d)
    assert len(calls) == 1 and ran == ["_MixedTapsConv" if c_in >= C_IN else "_MixedTapsPointwise"]
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=DT)
    got = torch.autograd.grad(out, [t for t in leaves if t is not None], up)
    expected = torch.autograd.grad(want, [t for t in refs if t is not None], up)
    for name, a, e in zip([n for n, t in zip("xwbm", leaves) if t is not None], got, expected):
        torch.testing.assert_close(a, e, atol=1e-9, rtol=0, msg=lambda msg, n=name: f"d/d{n}: {msg}")


@pytest.mark.parametrize("c_in,image_min", [(C_IN, 0), (C_IN, 1 << 30), (NARROW, 0)], ids=["image", "rows", "pointwise"])
def test_fused_input_side_partial_gradients(c_in, image_min, monkeypatch):
    """Only some inputs need a gradient (a first layer: not x; a frozen layer: only x): those are right."""
    monkeypatch.setattr(sides, "MIXED_IMAGE_MIN_POSITIONS", image_min)
    calls = _spy(monkeypatch)
    x, w, b, m = _case(CONFIGS[0], c_in=c_in)
    for wanted in ("m", "wb", "x"):
        leaves = [t.detach().clone().requires_grad_(n in wanted) for n, t in zip("xwbm", (x, w, b, m))]
        refs = [t.detach().clone().requires_grad_(n in wanted) for n, t in zip("xwbm", (x, w, b, m))]
        out, want = ns_conv2d(*leaves, 1, 1, side="input"), ns_conv_reference(*refs, 1, 1)
        up = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=DT)
        got = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], up)
        expected = torch.autograd.grad(want, [t for t in refs if t.requires_grad], up)
        for a, e in zip(got, expected):
            torch.testing.assert_close(a, e, atol=1e-9, rtol=0)
    assert len(calls) == 3


@pytest.mark.parametrize("c_in,image_min", [(C_IN, 0), (C_IN, 1 << 30), (NARROW, 0)], ids=["image", "rows", "pointwise"])
def test_fused_input_side_gradcheck_and_double_backward(c_in, image_min, monkeypatch):
    """Numerical gradients; the double backward (create_graph, e.g. second-order MAML through a dynamic layer)
    differentiates the differentiable input side from the saved inputs."""
    monkeypatch.setattr(sides, "MIXED_IMAGE_MIN_POSITIONS", image_min)
    calls = _spy(monkeypatch)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c_in, 4, 5, generator=g, dtype=DT, requires_grad=True)
    w = torch.randn(3, c_in, 3, 3, generator=g, dtype=DT, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=DT, requires_grad=True)
    m = torch.randn(2, 20, 9, generator=g, dtype=DT, requires_grad=True)

    def fn(*args):
        return ns_conv2d(*args, stride=1, padding=1, side="input")

    assert gradcheck(fn, (x, w, b, m))
    assert gradgradcheck(fn, (x, w, b, m), fast_mode=True)
    assert calls


def test_auto_takes_the_fused_input_side_on_cpu_for_dns_layers(monkeypatch):
    """``side="auto"`` on CPU, eager: every DNS layer takes the fused input side, at any stride and width; UNS
    layers do not, nor a traced (compiled) layer, nor any layer with ``CPU_FUSED_DNS`` off; a dynamic
    NSConv2d's forward (maps from its predictor) runs it."""
    calls = _spy(monkeypatch)
    wide, narrow = C_IN, NARROW
    ns_conv2d(torch.randn(1, wide, 9, 9), torch.randn(2, wide, 3, 3), None, torch.ones(1, 81, 9), 1, 1)
    ns_conv2d(torch.randn(1, wide, 9, 9), torch.randn(2, wide, 3, 3), None, torch.ones(1, 25, 9), 2, 1)  # strided
    ns_conv2d(torch.randn(1, narrow, 9, 9), torch.randn(2, narrow, 3, 3), None, torch.ones(1, 81, 9), 1, 1)
    ns_conv2d(torch.randn(1, wide, 9, 9), torch.randn(2, wide, 3, 3), None, torch.ones(1, 81, 9, 9), 1, 1)  # UNS
    assert [tuple(s) for s in calls] == [(1, wide, 9, 9)] * 2 + [(1, narrow, 9, 9)]
    args = ("dns", "cpu", (32, 4), (1, 1), (16, 16), 19 * 18, (18, 18))
    assert ns_conv_ops.choose_side(*args) == "input"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert ns_conv_ops.choose_side(*args) == "taps"  # traced: the earlier rule
    monkeypatch.undo()
    calls = _spy(monkeypatch)
    monkeypatch.setattr(ns_conv_ops, "CPU_FUSED_DNS", False)
    assert ns_conv_ops.choose_side(*args) == "taps"
    ns_conv2d(torch.randn(1, wide, 9, 9), torch.randn(2, wide, 3, 3), None, torch.ones(1, 81, 9), 1, 1, side="input")
    assert not calls
    monkeypatch.setattr(ns_conv_ops, "CPU_FUSED_DNS", True)
    layer = NSConv2d(wide, 4, 3, padding=1, mode="dynamic", zero_init_residual=False).to(DT)
    x = torch.randn(2, wide, 6, 6, dtype=DT).contiguous(memory_format=torch.channels_last)
    out = layer(x)
    torch.testing.assert_close(out, ns_conv_reference(x, layer.weight, layer.bias, layer.similarity(x), 1, 1), atol=1e-10, rtol=0)
    assert len(calls) == 1 and out.is_contiguous(memory_format=torch.channels_last)


def test_fused_input_side_under_bf16_autocast_is_close_to_fp32():
    """Under CPU bf16 autocast the fused path runs in bf16 (as the conv it generalises), returns bf16 and stays
    close to fp32; its weight gradient (a sum over chunks) is accumulated in fp32."""
    x, w, b, m = (t.float() for t in _case(CONFIGS[0], batch=4, c_in=16, hw=(8, 8)))
    leaves32 = [t.clone().requires_grad_() for t in (x, w, b, m)]
    leaves16 = [t.clone().requires_grad_() for t in (x, w, b, m)]
    out32 = ns_conv2d(*leaves32, 1, 1, side="input")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = ns_conv2d(*leaves16, 1, 1, side="input")
    assert out16.dtype == torch.bfloat16
    rel = (out16.float() - out32).norm() / out32.norm()
    assert rel < 0.02, rel
    out32.square().sum().backward()
    out16.float().square().sum().backward()
    for a, e in zip(leaves16, leaves32):
        assert a.grad.dtype == torch.float32
        assert (a.grad - e.grad).norm() / e.grad.norm() < 0.05
