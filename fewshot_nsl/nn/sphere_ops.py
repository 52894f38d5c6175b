"""Cosine (SphereConv) and input-normalised convolutions of the dynamic predictors, and their autograd Function.

* :func:`sphere_conv2d`: ``<w_o, X_l> / (||w_o|| ||X_l||)`` (the paper's SphereNet predictor).
* :func:`input_normalized_conv2d`: ``<w_o, X_l> / ||X_l||`` (the NSL authors' predictor, first layer).

Both divide by a per-location patch norm; :class:`_SphereConv` computes them with a written-out
backward. Under ``torch.autocast`` they run in fp32 (the smoothed norms and their reciprocal square
roots lose too much in bf16 / fp16) and return fp32: the Function declares it
(:func:`~fewshot_nsl.nn.amp.autocast_forward` with ``torch.float32``), and the op-level paths (dilated
filters, ``torch.compile``) run in the same fp32 region (:func:`~fewshot_nsl.nn.amp.in_float32`).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .amp import autocast_args, autocast_backward, autocast_forward, in_float32
from .geometry import IntPair, _pair

__all__ = ["sphere_conv2d", "input_normalized_conv2d"]


def sphere_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: IntPair = 1,
    padding: Union[IntPair, Sequence[int]] = 0,
    dilation: IntPair = 1,
    eps: float = 1e-4,
    out_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cosine (hyperspherical) convolution: ``<w_o, X_l> / (||w_o|| ||X_l||)``, in ``(-1, 1)``.

    Norms are ``sqrt(sum of squares + eps)``, so an all-zero patch or filter gives 0 with finite
    gradients (SphereNet, Liu et al. 2017, linear operator with a smoothed norm).

    Args:
        x: ``(B, C_in, H, W)``.
        weight: ``(C_out, C_in, kh, kw)``.
        stride: conv stride.
        padding: symmetric ``int``/pair, or explicit ``(left, right, top, bottom)`` (may be negative: crop).
        dilation: conv dilation.
        eps: added to the squared norms.
        out_scale: optional ``(C_out,)`` factor of each output channel, folded into the unit filters
            (the same values as multiplying the output, without a pass over the output map).

    Returns:
        ``(B, C_out, H_out, W_out)``, in ``x``'s memory format; fp32 inside an autocast region.

    With dilation 1 (every predictor) it runs as :class:`_SphereConv`: the padding goes to the conv
    (only the one-channel map of squared norms is padded, unless the padding is asymmetric or
    negative), the output is scaled in place and the backward is written out, so that the full-size
    maps are each read or written a few times instead of once per elementary op. Under
    ``torch.compile`` the plain formulation runs instead (the compiler fuses it).
    """
    # Unit filters (cheap: weight-sized), then one per-location scale by 1 / ||X_l||.
    return _patch_normalized_conv(x, _unit_filters(weight, eps, out_scale), stride, padding, dilation, eps)


def input_normalized_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: IntPair = 1,
    padding: Union[IntPair, Sequence[int]] = 0,
    dilation: IntPair = 1,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Convolution divided by the input patch norm only: ``<w_o, X_l> / sqrt(||X_l||^2 + eps)``.

    The first layer of the NSL authors' dynamic predictor (``github:wy1iu/NSL``,
    ``nsl_image_recog/experiments_cifar10/dynamic_dns/architecture.py``: ``_conv_layer(..., norm=True)``
    divides the conv by ``_get_input_norm``, ``sqrt(conv2d(x * x, ones) + 1e-4)``); unlike
    :func:`sphere_conv2d` the filter is not normalised, so the output is not bounded. Same fast path
    (:class:`_SphereConv`, with the raw filters) and the same arguments as :func:`sphere_conv2d`.

    Args:
        x: ``(B, C_in, H, W)``.
        weight: ``(C_out, C_in, kh, kw)``.
        stride: conv stride.
        padding: symmetric ``int``/pair, or explicit ``(left, right, top, bottom)`` (may be negative: crop).
        dilation: conv dilation.
        eps: added to the squared patch norm (the authors': 1e-4).

    Returns:
        ``(B, C_out, H_out, W_out)``, in ``x``'s memory format; fp32 inside an autocast region.
    """
    return _patch_normalized_conv(x, weight, stride, padding, dilation, eps)


def _patch_normalized_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: IntPair,
    padding: Union[IntPair, Sequence[int]],
    dilation: IntPair,
    eps: float,
) -> torch.Tensor:
    """``conv(x, weight) / sqrt(||X_l||^2 + eps)`` (arguments as :func:`sphere_conv2d`; ``weight`` used as given)."""
    if isinstance(padding, int) or len(padding) == 2:  # type: ignore[arg-type]
        ph, pw = _pair(padding, "padding")  # type: ignore[arg-type]
        pads = (pw, pw, ph, ph)
    else:
        pads = tuple(int(v) for v in padding)  # type: ignore[assignment]
    w_unit = weight  # unit-norm filters for SphereConv, raw ones for the input-normalised conv
    stride = _pair(stride, "stride")
    if _pair(dilation, "dilation") != (1, 1):
        return in_float32(_dilated_patch_normalized_conv, x, w_unit, stride, pads, _pair(dilation, "dilation"), eps)
    conv_pad = (0, 0)
    if pads[0] == pads[1] >= 0 and pads[2] == pads[3] >= 0:
        conv_pad = (pads[2], pads[0])
    elif any(pads):  # asymmetric or cropping: pad the input itself
        x = F.pad(x, pads)
    if torch.compiler.is_compiling():
        return in_float32(_sphere_conv_ops, x, w_unit, stride, conv_pad, eps)
    return _SphereConv.apply(*autocast_args(torch.float32, x, w_unit, stride, conv_pad, eps))


def _dilated_patch_normalized_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: Tuple[int, int],
    pads: Tuple[int, int, int, int],
    dilation: Tuple[int, int],
    eps: float,
) -> torch.Tensor:
    """``conv(x, weight) / sqrt(||X_l||^2 + eps)`` with dilated filters, in differentiable ops: ``(B, C_out, H_out, W_out)``."""
    if any(pads):
        x = F.pad(x, pads)
    num = F.conv2d(x, weight, None, stride, 0, dilation)
    ones = weight.new_ones((1, 1) + tuple(weight.shape[2:]))
    patch_sq = F.conv2d((x * x).sum(1, keepdim=True), ones, None, stride, 0, dilation).clamp_min(0.0)
    return num * torch.rsqrt(patch_sq + eps)


def _unit_filters(weight: torch.Tensor, eps: float, out_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``weight (C_out, C_in, kh, kw)`` over its smoothed norm per output channel, times ``out_scale (C_out,)`` if given."""
    w_unit = weight * torch.rsqrt(weight.flatten(1).pow(2).sum(1) + eps).view(-1, 1, 1, 1)
    return w_unit if out_scale is None else w_unit * out_scale.view(-1, 1, 1, 1)


def _squared_patch_norms(
    x: torch.Tensor, ksize: Tuple[int, int], stride: Tuple[int, int], conv_pad: Tuple[int, int]
) -> torch.Tensor:
    """``||X_l||^2`` of every conv patch of ``x (B, C, H, W)`` zero-padded by ``conv_pad``: ``(B, 1, H_out, W_out)``."""
    sq = torch.linalg.vector_norm(x, 2, dim=1, keepdim=True).square()  # one pass over x
    ph, pw = conv_pad
    if ph or pw:
        sq = F.pad(sq, (pw, pw, ph, ph))
    return _window_sums(sq, ksize, stride)


def _sphere_conv_ops(x, w_unit, stride, conv_pad, eps):
    """:class:`_SphereConv` in differentiable ops (under ``torch.compile`` and for double backward)."""
    num = F.conv2d(x, w_unit, None, stride, conv_pad)
    return num * torch.rsqrt(_squared_patch_norms(x, tuple(w_unit.shape[2:]), stride, conv_pad) + eps)


class _SphereConv(torch.autograd.Function):
    """``out = conv(x, w_unit, stride, conv_pad) * s``, ``s = (||X_l||^2 + eps)^(-1/2)`` per location.

    Inputs: ``x (B, C_in, H, W)``, ``w_unit (C_out, C_in, kh, kw)`` (already of unit norm, times any
    output scale, for :func:`sphere_conv2d`; any filters for :func:`input_normalized_conv2d`), ``stride``, symmetric ``conv_pad = (ph, pw)``, ``eps``. Saved: ``x``, ``w_unit``,
    ``s (B, 1, H_out, W_out)`` and the output (which the next layer keeps anyway). Backward, with
    ``g`` the output gradient: ``d num = g * s``; ``d P = -1/2 s^2 sum_o g * out`` (``P`` the
    squared patch norm); ``d x = conv_backward(d num) + 2 x * window_adjoint(d P)``;
    ``d w_unit = conv_backward(d num)``. Under ``create_graph`` it differentiates
    :func:`_sphere_conv_ops` instead (double backward). Autocast: runs in fp32 (``cast_inputs=torch.float32``).
    """

    @staticmethod
    @autocast_forward(torch.float32)
    def forward(ctx, x, w_unit, stride, conv_pad, eps):  # type: ignore[override]
        s = torch.rsqrt(_squared_patch_norms(x, tuple(w_unit.shape[2:]), stride, conv_pad) + eps)
        out = F.conv2d(x, w_unit, None, stride, conv_pad).mul_(s)
        ctx.save_for_backward(x, w_unit, s, out)
        ctx.stride, ctx.conv_pad, ctx.eps = stride, conv_pad, eps
        return out

    @staticmethod
    @autocast_backward
    def backward(ctx, grad):  # type: ignore[override]
        x, w_unit, s, out = ctx.saved_tensors
        stride, conv_pad, eps = ctx.stride, ctx.conv_pad, ctx.eps
        want_x, want_w = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph: a differentiable backward
            ref = _sphere_conv_ops(x, w_unit, stride, conv_pad, eps)  # from the saved inputs: stays connected
            inputs = [t for t, want in ((x, want_x), (w_unit, want_w)) if want]
            grads = iter(torch.autograd.grad(ref, inputs, grad, create_graph=True))
            return (next(grads) if want_x else None), (next(grads) if want_w else None), None, None, None
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad * s, x, w_unit, None, list(stride), list(conv_pad), [1, 1], False, [0, 0], 1, [want_x, want_w, False]
        )
        if want_x:
            d_patch = torch.linalg.vecdot(grad, out, dim=1).unsqueeze(1).mul_(s.square()).mul_(-0.5)
            d_sq = _window_sums_adjoint(d_patch, (int(x.shape[2]), int(x.shape[3])), tuple(w_unit.shape[2:]), stride, conv_pad)
            gx.addcmul_(x, d_sq.mul_(2.0))
        return gx, gw, None, None, None


def _window_sums(sq: torch.Tensor, ksize: Tuple[int, int], stride: Tuple[int, int]) -> torch.Tensor:
    """Sums of ``sq (B, 1, H, W)`` over every ``kh x kw`` window at ``stride``: ``(B, 1, H_out, W_out)``.

    Separable: ``kh`` strided row slices added, then ``kw`` strided column slices. Same values as
    ``avg_pool2d(..., divisor_override=1)`` up to rounding, about 3x faster forward and backward on
    CPU (the pooling kernel on one channel is slow).
    """
    (kh, kw), (sh, sw) = ksize, stride
    span_h = sh * ((sq.shape[2] - kh) // sh) + 1  # rows from the first to the last window start
    span_w = sw * ((sq.shape[3] - kw) // sw) + 1
    rows = sq[:, :, 0:span_h:sh]
    for i in range(1, kh):
        rows = rows + sq[:, :, i:i + span_h:sh]
    out = rows[..., 0:span_w:sw]
    for j in range(1, kw):
        out = out + rows[..., j:j + span_w:sw]
    return out


def _window_sums_adjoint(
    d_out: torch.Tensor, size: Tuple[int, int], ksize: Tuple[int, int], stride: Tuple[int, int], conv_pad: Tuple[int, int]
) -> torch.Tensor:
    """The adjoint of ``_window_sums(pad(sq, conv_pad), ksize, stride)``: ``d_out (B, 1, H_out, W_out)`` -> ``(B, 1, H, W)``."""
    (kh, kw), (sh, sw), (ph, pw) = ksize, stride, conv_pad
    height, width = size[0] + 2 * ph, size[1] + 2 * pw
    ho, wo = d_out.shape[2:]
    span_h, span_w = sh * (ho - 1) + 1, sw * (wo - 1) + 1
    rows = d_out.new_zeros((d_out.shape[0], 1, ho, width))
    for j in range(kw):
        rows[..., j:j + span_w:sw] += d_out
    d_sq = d_out.new_zeros((d_out.shape[0], 1, height, width))
    for i in range(kh):
        d_sq[:, :, i:i + span_h:sh] += rows
    return d_sq[:, :, ph:ph + size[0], pw:pw + size[1]]
