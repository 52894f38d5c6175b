"""The ``side="input"`` and ``side="output"`` applications of a dynamic similarity and their autograd Functions.

Both do the plain conv's multiply-adds as one batched GEMM plus an element-wise term over the ``kk``
kernel taps, read as strided slices of the padded input (never the raw ``(B, C_in * kk, L)`` unfold
matrix), with hand-written backwards that accumulate the taps' gradients into one buffer (autograd
through ``kk`` slices would allocate a zero-filled full-size gradient per tap):

* :func:`input_side`: mix the taps, ``X'_p(l) = sum_q M_s(l)[p, q] X_q(l)`` (:class:`_MixInputTaps`),
  then ``out = W_(O x kk*C_in) @ X'``.
* :func:`output_side`: ``Y_p = W[:, :, p] x`` (one GEMM to ``kk * C_out`` maps), then
  ``out(l) = sum_{p,q} M_s(l)[p, q] Y_p(l + tap q)`` (:class:`_GatherOutputTaps`).

Called by :func:`fewshot_nsl.nn.ns_conv_ops.ns_conv2d`, which chooses the side and documents the costs.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .amp import AUTOCAST_DTYPE, autocast_args, autocast_backward, autocast_forward

__all__ = ["input_side", "output_side", "dns_input_side_cpu"]

Taps = List[Tuple[slice, slice]]


def input_side(xp: torch.Tensor, weight: torch.Tensor, maps: torch.Tensor, taps: Taps) -> torch.Tensor:
    """``W^T M X`` by mixing the input taps first, without bias.

    Args:
        xp: the padded input, cropped to the rows/cols any tap reads, ``(B, C_in, Hu, Wu)``.
        weight: ``(C_out, C_in, kh, kw)``.
        maps: DNS ``(B, kk, Ho, Wo)`` or UNS ``(B, kk, kk, Ho, Wo)``, contiguous.
        taps: the ``kk`` tap slices of ``xp``.

    Returns:
        ``(B, C_out, Ho, Wo)``.
    """
    batch, c_in = xp.shape[:2]
    c_out, kk = weight.shape[0], len(taps)
    ho, wo = maps.shape[-2:]
    mixed = _MixInputTaps.apply(*autocast_args(AUTOCAST_DTYPE, xp, maps, taps))  # (B, kk, C_in, Ho, Wo)
    w1 = weight.permute(0, 2, 3, 1).reshape(c_out, kk * c_in)  # tap-major, matches `mixed`
    # bmm on an expanded weight: no layout copies (matmul(2-D, 3-D) transposes the 3-D operand).
    return torch.bmm(w1.expand(batch, -1, -1), mixed.view(batch, kk * c_in, ho * wo)).view(batch, c_out, ho, wo)


def output_side(xp: torch.Tensor, weight: torch.Tensor, maps: torch.Tensor, taps: Taps) -> torch.Tensor:
    """``W^T M X`` by applying every weight tap at every input position first, without bias.

    Args:
        xp: the padded input, cropped to the rows/cols any tap reads, ``(B, C_in, Hu, Wu)``.
        weight: ``(C_out, C_in, kh, kw)``.
        maps: DNS ``(B, kk, Ho, Wo)`` or UNS ``(B, kk, kk, Ho, Wo)``, contiguous.
        taps: the ``kk`` tap slices of ``xp``.

    Returns:
        ``(B, C_out, Ho, Wo)``.
    """
    batch, c_in, hu, wu = xp.shape
    c_out, kk = weight.shape[0], len(taps)
    wt = weight.permute(2, 3, 0, 1).reshape(kk * c_out, c_in)
    y = torch.bmm(wt.expand(batch, -1, -1), xp.reshape(batch, c_in, hu * wu)).view(batch, kk, c_out, hu, wu)
    return _GatherOutputTaps.apply(*autocast_args(AUTOCAST_DTYPE, y, maps.to(y.dtype), taps))


def _tap_pairs(taps: Taps, dns: bool, q_major: bool = False) -> List[Tuple[int, int, slice, slice]]:
    """The entries ``(p, q)`` of ``M_s`` a similarity mixes, with tap ``q``'s ``(rows, cols)``.

    DNS: the ``kk`` pairs ``(p, p)``; UNS: all ``kk * kk`` pairs, ``p``-major (``q``-major with
    ``q_major``). The order is the order of accumulation, so it is part of the numbers.
    """
    kk = len(taps)
    if dns:
        return [(p, p, rs, cs) for p, (rs, cs) in enumerate(taps)]
    pairs = [(p, q) for q in range(kk) for p in range(kk)] if q_major else [(p, q) for p in range(kk) for q in range(kk)]
    return [(p, q) + taps[q] for p, q in pairs]


def _mixing_terms(taps: Taps, maps: torch.Tensor, q_major: bool = False) -> List[Tuple[int, int, slice, slice, torch.Tensor]]:
    """:func:`_tap_pairs` with each term's coefficient ``M[:, p, q]`` appended, a ``(B, 1, Ho, Wo)`` view.

    Args:
        taps: the ``kk`` tap slices.
        maps: DNS ``(B, kk, Ho, Wo)`` or UNS ``(B, kk, kk, Ho, Wo)`` (contiguous); the views are made
            by one ``split``, cheaper than ``kk * kk`` indexing ops.
        q_major: order of the UNS pairs.
    """
    kk, dns = len(taps), maps.dim() == 4
    coefs = maps.split(1, dim=1) if dns else maps.flatten(1, 2).split(1, dim=1)
    return [(p, q, rs, cs, coefs[p if dns else p * kk + q]) for p, q, rs, cs in _tap_pairs(taps, dns, q_major)]


def _similarity_grad(taps: Taps, dns: bool, product: Callable[[int, slice, slice], torch.Tensor]) -> torch.Tensor:
    """Gradient w.r.t. the maps, ``(B, kk, Ho, Wo)`` (DNS) or ``(B, kk, kk, Ho, Wo)``: entry ``(p, q)`` is
    ``product(p, *tap q)``, the ``(B, Ho, Wo)`` channel sum of the upstream gradient times what ``M[:, p, q]``
    multiplied. One ``(B, C, Ho, Wo)`` temporary at a time; UNS rows are stacked as they are made (one flat
    stack of ``kk * kk`` sums raised the peak RSS several-fold through glibc heap fragmentation).
    """
    if dns:
        return torch.stack([product(p, rs, cs) for p, (rs, cs) in enumerate(taps)], 1)
    return torch.stack([torch.stack([product(p, rs, cs) for rs, cs in taps], 1) for p in range(len(taps))], 1)


class _MixInputTaps(torch.autograd.Function):
    """``X'[:, p] = sum_q M[:, p, q] * xp[tap q]`` (DNS: ``m[:, p] * xp[tap p]``): ``(B, kk, C, Ho, Wo)``.

    The backward accumulates every tap's gradient into one buffer with in-place ``addcmul_``;
    only ``xp`` and the similarity are saved. The backward is built from differentiable ops,
    so double backward works. Eager, each tap is written into its slice of the output (``out=``);
    while ``torch.compile`` traces, the taps are stacked instead (dynamo does not trace ``out=``
    into a non-contiguous view; the compiler fuses the stack into one kernel). Autocast: runs in
    the region's autocast dtype, the dtype of the GEMM that reads ``X'``.
    """

    @staticmethod
    @autocast_forward(AUTOCAST_DTYPE)
    def forward(ctx, xp: torch.Tensor, maps: torch.Tensor, taps: Taps) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(xp, maps)
        ctx.taps = taps
        if torch.compiler.is_compiling():
            return _mix_input_taps_ops(xp, maps, taps)
        batch, chans = xp.shape[:2]
        out = xp.new_empty((batch, len(taps), chans) + tuple(maps.shape[-2:]))
        dns = maps.dim() == 4
        for p, q, rs, cs, mpq in _mixing_terms(taps, maps):
            if dns or q == 0:  # first term of out[:, p]
                torch.mul(xp[:, :, rs, cs], mpq, out=out[:, p])
            else:
                out[:, p].addcmul_(xp[:, :, rs, cs], mpq)
        return out

    @staticmethod
    @autocast_backward
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        xp, maps = ctx.saved_tensors
        grad_xp = grad_maps = None
        if ctx.needs_input_grad[0]:
            grad_xp = torch.zeros_like(xp, memory_format=torch.contiguous_format)
            for p, _, rs, cs, mpq in _mixing_terms(ctx.taps, maps, q_major=True):
                grad_xp[:, :, rs, cs].addcmul_(grad[:, p], mpq)
        if ctx.needs_input_grad[1]:
            grad_maps = _similarity_grad(ctx.taps, maps.dim() == 4, lambda p, rs, cs: (grad[:, p] * xp[:, :, rs, cs]).sum(1))
        return grad_xp, grad_maps, None


def _mix_input_taps_ops(xp: torch.Tensor, maps: torch.Tensor, taps: Taps) -> torch.Tensor:
    """The forward of :class:`_MixInputTaps` without ``out=`` (traced by ``torch.compile``): ``(B, kk, C, Ho, Wo)``."""
    rows: List[torch.Tensor] = []
    for p, q, rs, cs, mpq in _mixing_terms(taps, maps):
        term = xp[:, :, rs, cs] * mpq
        if maps.dim() == 4 or q == 0:
            rows.append(term)
        else:
            rows[p] = rows[p] + term
    return torch.stack(rows, 1)


class _GatherOutputTaps(torch.autograd.Function):
    """``out = sum_{p,q} M[:, p, q] * y[:, p, :, tap q]`` (DNS: ``sum_p m[:, p] * y[:, p, :, tap p]``): ``(B, O, Ho, Wo)``.

    Autocast: runs in the region's autocast dtype, the dtype of the GEMM that made ``y``.
    """

    @staticmethod
    @autocast_forward(AUTOCAST_DTYPE)
    def forward(ctx, y: torch.Tensor, maps: torch.Tensor, taps: Taps) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(y, maps)
        ctx.taps = taps
        out = y.new_zeros((y.shape[0], y.shape[2]) + tuple(maps.shape[-2:]))
        for p, _, rs, cs, mpq in _mixing_terms(taps, maps):
            out.addcmul_(y[:, p, :, rs, cs], mpq)
        return out

    @staticmethod
    @autocast_backward
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        y, maps = ctx.saved_tensors
        grad_y = grad_maps = None
        if ctx.needs_input_grad[0]:
            grad_y = torch.zeros_like(y)
            for p, _, rs, cs, mpq in _mixing_terms(ctx.taps, maps):
                grad_y[:, p, :, rs, cs].addcmul_(grad, mpq)
        if ctx.needs_input_grad[1]:
            grad_maps = _similarity_grad(ctx.taps, maps.dim() == 4, lambda p, rs, cs: (grad * y[:, p, :, rs, cs]).sum(1))
        return grad_y, grad_maps, None


# ----------------------------------------------------------------------------- DNS input side, CPU (eager)
#: Bytes of the mixed-tap image of one image chunk on the ``"input"`` side of a DNS layer on CPU
#: (:class:`_MixedTapsConv`): images go in chunks of about this size so that the chunk's mixed taps, made,
#: read by the conv and recomputed in the backward, stay in the cache. Of 512 KiB, 2 MiB and 8 MiB, 2 MiB
#: was fastest for the four CNN-4 layers at 42 px (1 thread, loaded 2-core CPU; issue 29, commit messages).
MIXED_CHUNK_BYTES = 1 << 21
#: Maps with fewer output positions than this lay their mixed taps out as rows and multiply them by a 1x1
#: conv; larger ones as an image convolved at stride ``(kh, kw)`` (:class:`_MixedTapsConv`). oneDNN, 1 thread,
#: 32 channels, fwd / bwd ms: 21x21 (4 images) 0.20 / 0.65 strided vs 0.36 / 0.76 1x1; 10x10 (18 images) 0.22 /
#: 0.55 vs 0.16 / 0.34; 5x5 (64 images) 0.17 / 0.67 vs 0.15 / 0.32.
MIXED_IMAGE_MIN_POSITIONS = 256
#: Fewer input channels than this (the RGB stem) take :class:`_MixedTapsPointwise`: :class:`_MixedTapsConv`'s
#: mixing runs along ``C_in``, 3 values at a time for RGB, 20x slower than along the output width.
MIXED_CONV_MIN_CHANNELS = 8


def dns_input_side_cpu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    m: torch.Tensor,
    stride: Tuple[int, int],
    pads: Tuple[int, int, int, int],
    dil: Tuple[int, int],
    out_hw: Tuple[int, int],
) -> torch.Tensor:
    """The ``side="input"`` DNS application in eager CPU code, with bias: ``(B, C_out, Ho, Wo)``, channels-last.

    Same values as :func:`input_side` (mix the taps, ``X'_p(l) = m_p(l) X_p(l)``, then one GEMM over
    ``kk * C_in``) in far fewer operator calls (:class:`_MixedTapsConv`): per chunk of images the mixing of
    all ``kk`` taps is one ``mul`` of a strided view of the padded channels-last input (an im2col as a
    view, never copied) by the maps, and the GEMM is one oneDNN convolution. The mixed taps are
    recomputed in the backward, not saved (saved: the padded input and the maps, as the taps side).
    With fewer than ``MIXED_CONV_MIN_CHANNELS`` input channels (the RGB stem) the taps are mixed
    channel-first instead and the GEMM is a 1x1 convolution (:class:`_MixedTapsPointwise`).

    Args:
        x: ``(B, C_in, H, W)``.
        weight: ``(C_out, C_in, kh, kw)``.
        bias: ``(C_out,)`` or ``None``.
        m: the DNS similarity, ``(B, L, kk)``.
        stride, pads, dil: the conv's stride, explicit ``(l, r, t, b)`` padding and dilation.
        out_hw: ``(Ho, Wo)``.
    """
    kh, kw = int(weight.shape[2]), int(weight.shape[3])
    (ho, wo), batch = out_hw, x.shape[0]
    xp = F.pad(x, pads) if any(pads) else x
    hu = dil[0] * (kh - 1) + stride[0] * (ho - 1) + 1
    wu = dil[1] * (kw - 1) + stride[1] * (wo - 1) + 1
    xp = xp[:, :, :hu, :wu]
    if x.shape[1] < MIXED_CONV_MIN_CHANNELS:
        maps = m.transpose(1, 2).reshape(batch, kh * kw, ho, wo).contiguous()
        return _MixedTapsPointwise.apply(*autocast_args(AUTOCAST_DTYPE, xp.contiguous(), weight, bias, maps, stride, dil))
    xp = xp.contiguous(memory_format=torch.channels_last)
    m5 = m.reshape(batch, ho, wo, kh, kw)  # free when m came from NSConv2d.similarity() on channels-last maps
    return _MixedTapsConv.apply(*autocast_args(AUTOCAST_DTYPE, xp, weight, bias, m5, stride, dil))


def _image_chunks(batch: int, per_image: int) -> List[Tuple[int, int]]:
    """``[(b0, b1), ...]`` covering ``range(batch)``, about ``MIXED_CHUNK_BYTES * threads`` bytes (``per_image`` each) apiece."""
    per = max(1, MIXED_CHUNK_BYTES * torch.get_num_threads() // max(1, per_image))
    return [(b0, min(batch, b0 + per)) for b0 in range(0, batch, per)]


def _taps_view(xp: torch.Tensor, b0: int, b1: int, stride, dil, out_hw, ksize) -> torch.Tensor:
    """Every tap of images ``b0:b1`` of ``xp (B, C, Hu, Wu)`` as one strided view (no copy): ``(nb, Ho, kh, Wo, kw, C)``,
    for a channels-last ``xp`` the layout of a ``(nb, C, Ho*kh, Wo*kw)`` channels-last image whose ``kh x kw`` blocks are the patches."""
    (sh, sw), (dh, dw), (ho, wo), (kh, kw) = stride, dil, out_hw, ksize
    sb, sc, sy, sx = xp.stride()
    return xp.as_strided((b1 - b0, ho, kh, wo, kw, xp.shape[1]), (sb, sh * sy, dh * sy, sw * sx, dw * sx, sc), xp.storage_offset() + b0 * sb)


def _differentiable_input_side(xp, weight, bias, maps, stride, dil):
    """:func:`input_side` (plus bias) on ``xp`` and channel-first ``maps (B, kk, Ho, Wo)``, in differentiable ops (double backward)."""
    from .geometry import _tap_slices

    taps = _tap_slices(tuple(weight.shape[2:]), stride, dil, tuple(maps.shape[2:]))
    out = input_side(xp, weight, maps, taps)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def _double_backward(ctx, saved, maps, grad):
    """Gradients of the saved ``(xp, weight, bias, m5)`` under ``create_graph``: autograd through :func:`_differentiable_input_side`
    on ``maps``, the channel-first view of ``m5``."""
    xp, weight, bias, _ = saved
    out = _differentiable_input_side(xp, weight, bias, maps, ctx.stride, ctx.dil)
    wanted = [t for t, want in zip(saved, ctx.needs_input_grad[:4]) if want and t is not None]
    grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
    return tuple(next(grads) if want and t is not None else None for t, want in zip(saved, ctx.needs_input_grad[:4])) + (None, None)


class _MixedTapsConv(torch.autograd.Function):
    """DNS ``W^T M X`` (plus bias) as a oneDNN convolution on the mixed taps: ``(B, C_out, Ho, Wo)`` channels-last.

    Inputs: ``xp (B, C, Hu, Wu)`` (padded, cropped, channels-last), ``weight (C_out, C, kh, kw)``, ``bias``
    or ``None``, ``m5 (B, Ho, Wo, kh, kw)`` (the maps), ``stride``, ``dil``. Per chunk of images:
    ``Z[b, h, i, w, j, c] = m5[b, h, w, i, j] * xp[b, c, h*sh + i*dh, w*sw + j*dw]`` (one ``mul`` of a
    strided view into a reused buffer) and one GEMM over ``kk * C`` as a oneDNN convolution: on maps of
    at least ``MIXED_IMAGE_MIN_POSITIONS`` outputs ``Z`` is laid out as the channels-last image ``(nb, C,
    Ho*kh, Wo*kw)`` and convolved with ``weight`` at stride ``(kh, kw)`` (the patches do not overlap);
    on smaller maps as rows ``(nb, kk*C, Ho, Wo)`` and convolved 1x1 (:func:`_pointwise`), 2x faster there.
    Backward per chunk: ``Z`` recomputed, one ``convolution_backward`` (``dZ``, ``dW``, ``db``), ``dm =
    sum_c dZ * taps``, ``dx`` the ``kk`` taps of ``dZ`` times ``m`` added into their slices (one ``addcmul_`` per
    tap: a separate ``dZ * m`` pass first took twice as long). Under ``create_graph`` it differentiates
    :func:`_differentiable_input_side` instead.
    """

    @staticmethod
    @autocast_forward(AUTOCAST_DTYPE)
    def forward(ctx, xp, weight, bias, m5, stride, dil):  # type: ignore[override]
        ctx.save_for_backward(xp, weight, bias, m5)
        ctx.stride, ctx.dil = stride, dil
        mixed = _MixedLayout(xp, weight, m5)
        out = _channels_last_output(xp, weight, m5.shape[1:3])
        for b0, b1 in mixed.chunks:
            mixed.conv(mixed.mix(b0, b1, stride, dil), bias, out[b0:b1])
        return out

    @staticmethod
    @autocast_backward
    def backward(ctx, grad):  # type: ignore[override]
        xp, weight, bias, m5 = ctx.saved_tensors
        if torch.is_grad_enabled():
            maps = m5.flatten(3).permute(0, 3, 1, 2)
            return _double_backward(ctx, (xp, weight, bias, m5), maps, grad)
        stride, dil = ctx.stride, ctx.dil
        (sh, sw), (dh, dw) = stride, dil
        kh, kw = int(weight.shape[2]), int(weight.shape[3])
        ho, wo = m5.shape[1:3]
        want_x, want_w, want_b, want_m = ctx.needs_input_grad[:4]
        want_b = want_b and bias is not None
        grad = grad.contiguous(memory_format=torch.channels_last)
        mixed = _MixedLayout(xp, weight, m5)
        gw = torch.zeros_like(mixed.conv_weight, dtype=_accumulator(weight.dtype)) if want_w else None
        gb = torch.zeros_like(bias, dtype=_accumulator(bias.dtype)) if want_b else None
        gm = torch.empty_like(m5) if want_m else None
        gx = torch.zeros_like(xp, memory_format=torch.channels_last) if want_x else None
        gx_last = gx.permute(0, 2, 3, 1) if gx is not None else None  # (B, Hu, Wu, C), a view
        for b0, b1 in mixed.chunks:
            z = mixed.mix(b0, b1, stride, dil)
            gz, gw_c, gb_c = mixed.conv_backward(grad[b0:b1], z, bias, [want_x or want_m, gw is not None, gb is not None])
            if gw is not None:
                gw.add_(gw_c)
            if gb is not None:
                gb.add_(gb_c)
            if not (want_x or want_m):
                continue
            gz6 = mixed.logical(gz.permute(0, 2, 3, 1), b1 - b0)  # (nb, Ho, kh, Wo, kw, C), a view of channels-last gz
            if gm is not None:
                prod = torch.mul(gz6, _taps_view(xp, b0, b1, stride, dil, (ho, wo), (kh, kw)), out=z)
                mixed.channel_sum(prod, gm[b0:b1])
            if gx_last is not None:
                m6 = m5[b0:b1].unsqueeze(-1)  # (nb, Ho, Wo, kh, kw, 1)
                for i in range(kh):
                    rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
                    for j in range(kw):
                        cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
                        gx_last[b0:b1, rows, cols].addcmul_(gz6[:, :, i, :, j], m6[:, :, :, i, j])
        if gw is not None and mixed.pointwise:
            gw = gw.view(weight.shape[0], kh, kw, -1).permute(0, 3, 1, 2)
        return gx, gw, gb, gm, None, None


class _MixedLayout:
    """How :class:`_MixedTapsConv` lays out the mixed taps of ``xp`` and ``m5`` and convolves them (see there).

    Attributes:
        pointwise: rows ``(nb, Ho, Wo, kh, kw, C)`` and a 1x1 conv (small maps), else the image ``(nb, Ho, kh,
            Wo, kw, C)`` and a conv at stride ``(kh, kw)``.
        conv_weight, conv_stride: the conv's weight and stride.
        chunks: the image chunks, ``[(b0, b1), ...]``.
    """

    def __init__(self, xp: torch.Tensor, weight: torch.Tensor, m5: torch.Tensor) -> None:
        self.xp, self.m5 = xp, m5
        self.kh, self.kw = int(weight.shape[2]), int(weight.shape[3])
        self.ho, self.wo = int(m5.shape[1]), int(m5.shape[2])
        self.chans = int(xp.shape[1])
        self.pointwise = self.ho * self.wo < MIXED_IMAGE_MIN_POSITIONS
        self.conv_weight = _pointwise(weight) if self.pointwise else weight
        self.conv_stride = (1, 1) if self.pointwise else (self.kh, self.kw)
        per_image = self.ho * self.wo * self.kh * self.kw * self.chans * xp.element_size()
        self.chunks = _image_chunks(int(xp.shape[0]), per_image)
        self.buffer = xp.new_empty((self.chunks[0][1] - self.chunks[0][0], self.ho * self.wo * self.kh * self.kw * self.chans))

    def logical(self, physical: torch.Tensor, nb: int) -> torch.Tensor:
        """``(nb, Ho, kh, Wo, kw, C)`` view of a contiguous block laid out as this layout's rows or image."""
        if self.pointwise:
            return physical.reshape(nb, self.ho, self.wo, self.kh, self.kw, self.chans).permute(0, 1, 3, 2, 4, 5)
        return physical.reshape(nb, self.ho, self.kh, self.wo, self.kw, self.chans)

    def mix(self, b0: int, b1: int, stride, dil) -> torch.Tensor:
        """The mixed taps of images ``b0:b1``, one ``mul`` into the reused buffer: ``(nb, Ho, kh, Wo, kw, C)`` (logical view)."""
        z = self.logical(self.buffer[:b1 - b0], b1 - b0)
        taps = _taps_view(self.xp, b0, b1, stride, dil, (self.ho, self.wo), (self.kh, self.kw))
        return torch.mul(taps, self.m5[b0:b1].permute(0, 1, 3, 2, 4).unsqueeze(-1), out=z)

    def conv(self, z: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor) -> None:
        """The layer's output for mixed taps ``z`` (from :meth:`mix`) into ``out (nb, C_out, Ho, Wo)``, channels-last."""
        if self.pointwise:
            _conv1x1(self.image(z), self.conv_weight, bias, out)
        else:
            _conv_into(self.image(z), self.conv_weight, bias, self.conv_stride, out)

    def conv_backward(self, grad: torch.Tensor, z: torch.Tensor, bias: Optional[torch.Tensor], mask: List[bool]):
        """``convolution_backward`` of :meth:`conv`: ``(dZ as the conv input, d conv_weight, d bias)``."""
        if self.pointwise:
            return _conv1x1_backward(grad, self.image(z), self.conv_weight, bias, mask)
        return torch.ops.aten.convolution_backward(grad, self.image(z), self.conv_weight, None if bias is None else [bias.shape[0]],
                                                   list(self.conv_stride), [0, 0], [1, 1], False, [0, 0], 1, mask)

    def channel_sum(self, prod: torch.Tensor, out: torch.Tensor) -> None:
        """``out (nb, Ho, Wo, kh, kw)`` = the sum over ``C`` of ``prod`` (a :meth:`logical` view of a contiguous block).

        The sum runs in the block's own order into a contiguous tensor (a reduction written through a
        permuted ``out`` view ran 1.4x slower): straight into ``out`` for the rows layout, whose order is
        ``out``'s, through a small buffer and one copy (``1 / C`` of the block) for the image layout.
        """
        if self.pointwise:
            torch.sum(prod.permute(0, 1, 3, 2, 4, 5), -1, out=out)
        else:
            out.permute(0, 1, 3, 2, 4).copy_(torch.sum(prod, -1))

    def image(self, z: torch.Tensor) -> torch.Tensor:
        """The conv input of mixed taps ``z`` (from :meth:`mix`): channels-last ``(nb, kk*C, Ho, Wo)`` or ``(nb, C, Ho*kh, Wo*kw)``."""
        nb = z.shape[0]
        if self.pointwise:
            return z.permute(0, 1, 3, 2, 4, 5).reshape(nb, self.ho, self.wo, -1).permute(0, 3, 1, 2)
        return z.reshape(nb, self.ho * self.kh, self.wo * self.kw, self.chans).permute(0, 3, 1, 2)


class _MixedTapsPointwise(torch.autograd.Function):
    """DNS ``W^T M X`` (plus bias) for few input channels: ``(B, C_out, Ho, Wo)``, channels-last.

    Inputs: ``xp (B, C, Hu, Wu)`` (padded, cropped, contiguous), ``weight``, ``bias`` or ``None``, ``maps
    (B, kk, Ho, Wo)`` contiguous, ``stride``, ``dil``. Per chunk of images: the mixed taps ``Z (nb, kh,
    kw, C, Ho, Wo)`` are one ``mul`` along the output width (with ``C`` innermost it would run 3 values at
    a time), copied once to rows ``(nb, L, kk*C)``, and the GEMM is a 1x1 oneDNN convolution of that
    channels-last image (2x faster than a batched GEMM here). Backward per chunk: ``Z`` recomputed, one
    ``convolution_backward``, ``dZ`` copied back channel-first, ``dm = sum_c dZ * taps``, ``dx`` the taps
    of ``dZ * m`` added into their slices. Under ``create_graph`` it differentiates
    :func:`_differentiable_input_side` instead.
    """

    @staticmethod
    @autocast_forward(AUTOCAST_DTYPE)
    def forward(ctx, xp, weight, bias, maps, stride, dil):  # type: ignore[override]
        ctx.save_for_backward(xp, weight, bias, maps)
        ctx.stride, ctx.dil = stride, dil
        pointwise = _pointwise(weight)
        out, bufs = _channels_last_output(xp, weight, maps.shape[2:]), None
        for b0, b1 in _image_chunks(xp.shape[0], maps[0].numel() * xp.shape[1] * xp.element_size()):
            bufs = _pointwise_buffers(bufs, xp, maps, b1 - b0)
            _conv1x1(_mixed_rows(xp, maps, b0, b1, tuple(weight.shape[2:]), stride, dil, bufs), pointwise, bias, out[b0:b1])
        return out

    @staticmethod
    @autocast_backward
    def backward(ctx, grad):  # type: ignore[override]
        xp, weight, bias, maps = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _double_backward(ctx, (xp, weight, bias, maps), maps, grad)
        stride, dil = ctx.stride, ctx.dil
        (sh, sw), (dh, dw) = stride, dil
        want_x, want_w, want_b, want_m = ctx.needs_input_grad[:4]
        want_b = want_b and bias is not None
        batch, chans = xp.shape[:2]
        c_out, kh, kw = int(weight.shape[0]), int(weight.shape[2]), int(weight.shape[3])
        ho, wo = maps.shape[2:]
        grad = grad.contiguous(memory_format=torch.channels_last)
        pointwise = _pointwise(weight)
        gw = torch.zeros_like(pointwise, dtype=_accumulator(weight.dtype)) if want_w else None
        gb = torch.zeros_like(bias, dtype=_accumulator(bias.dtype)) if want_b else None
        gm = torch.empty_like(maps) if want_m else None
        gx = torch.zeros_like(xp) if want_x else None
        bufs = None
        for b0, b1 in _image_chunks(batch, maps[0].numel() * chans * xp.element_size()):
            nb = b1 - b0
            bufs = _pointwise_buffers(bufs, xp, maps, nb)
            image = _mixed_rows(xp, maps, b0, b1, (kh, kw), stride, dil, bufs)
            gz, gw_c, gb_c = _conv1x1_backward(grad[b0:b1], image, pointwise, bias, [want_x or want_m, gw is not None, gb is not None])
            if gw is not None:
                gw.add_(gw_c)
            if gb is not None:
                gb.add_(gb_c)
            if not (want_x or want_m):
                continue
            z, _ = bufs
            gz_cf = z.new_empty((nb, kh, kw, chans, ho, wo))
            gz_cf.view(nb, -1, ho * wo).copy_(gz.permute(0, 2, 3, 1).reshape(nb, ho * wo, -1).transpose(1, 2))
            if gm is not None:
                prod = torch.mul(gz_cf, _taps_view_cf(xp, b0, b1, stride, dil, (ho, wo), (kh, kw)), out=z[:nb].view(gz_cf.shape))
                torch.sum(prod, 3, out=gm[b0:b1].view(nb, kh, kw, ho, wo))
            if gx is not None:
                gz_cf.mul_(maps[b0:b1].view(nb, kh, kw, 1, ho, wo))
                for i in range(kh):
                    rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
                    for j in range(kw):
                        gx[b0:b1, :, rows, j * dw:j * dw + sw * (wo - 1) + 1:sw].add_(gz_cf[:, i, j])
        if gw is not None:
            gw = gw.view(c_out, kh, kw, chans).permute(0, 3, 1, 2)
        return gx, gw, gb, gm, None, None


def _pointwise(weight: torch.Tensor) -> torch.Tensor:
    """``weight (C_out, C, kh, kw)`` as a 1x1 conv weight over mixed-tap rows: ``(C_out, kh*kw*C, 1, 1)``, rows ``(i, j, c)``."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1, 1, 1)


def _rows_batch(t: torch.Tensor) -> torch.Tensor:
    """``(nb, K, Ho, Wo)`` channels-last as the channels-last ``(nb*Ho, K, 1, Wo)`` (a view): the same 1x1 conv,
    with a batch that oneDNN takes (at one thread PyTorch sends 1x1 convs of a batch under 16 to its slow
    path: 2.3x slower here)."""
    nb, k, ho, wo = t.shape
    return t.permute(0, 2, 3, 1).reshape(nb * ho, 1, wo, k).permute(0, 3, 1, 2)


def _rows_unbatch(t: torch.Tensor, nb: int) -> torch.Tensor:
    """The inverse of :func:`_rows_batch`: ``(nb*Ho, K, 1, Wo)`` channels-last -> ``(nb, K, Ho, Wo)`` channels-last."""
    k, wo = t.shape[1], t.shape[3]
    return t.permute(0, 2, 3, 1).reshape(nb, -1, wo, k).permute(0, 3, 1, 2)


def _channels_last_output(xp: torch.Tensor, weight: torch.Tensor, out_hw) -> torch.Tensor:
    """An empty channels-last ``(B, C_out, Ho, Wo)`` for the layer's output (the chunks' convs write into it)."""
    return xp.new_empty((xp.shape[0], int(out_hw[0]), int(out_hw[1]), weight.shape[0])).permute(0, 3, 1, 2)


def _conv_into(image, weight, bias, stride, out: torch.Tensor) -> None:
    """``out[...] = conv2d(image, weight, bias, stride)`` (no padding): written while the chunk is in the cache,
    where ``torch.cat`` of the chunks' outputs would read them all again."""
    torch.ops.aten.convolution.out(image, weight, bias, list(stride), [0, 0], [1, 1], False, [0, 0], 1, out=out)


def _conv1x1(image: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """``out[...] = conv2d(image, weight (C_out, K, 1, 1), bias)`` for channels-last ``image (nb, K, Ho, Wo)`` and ``out``,
    on oneDNN (:func:`_rows_batch`)."""
    _conv_into(_rows_batch(image), weight, bias, (1, 1), _rows_batch(out))


def _conv1x1_backward(grad, image, weight, bias, mask):
    """``convolution_backward`` of :func:`_conv1x1`: ``(d image, d weight, d bias)``."""
    gi, gw, gb = torch.ops.aten.convolution_backward(
        _rows_batch(grad), _rows_batch(image), weight, None if bias is None else [bias.shape[0]], [1, 1], [0, 0], [1, 1],
        False, [0, 0], 1, mask)
    return (None if gi is None else _rows_unbatch(gi, image.shape[0])), gw, gb


def _pointwise_buffers(bufs, xp, maps, nb):
    """The reused ``(Z channel-first, rows)`` buffers of :class:`_MixedTapsPointwise` for chunks of up to ``nb`` images."""
    if bufs is not None and bufs[0].shape[0] >= nb:
        return bufs
    kk, ho, wo = maps.shape[1:]
    return xp.new_empty((nb, kk, xp.shape[1], ho, wo)), xp.new_empty((nb, ho * wo, kk * xp.shape[1]))


def _taps_view_cf(xp, b0, b1, stride, dil, out_hw, ksize) -> torch.Tensor:
    """Every tap of images ``b0:b1`` of a contiguous ``xp (B, C, Hu, Wu)``: ``(nb, kh, kw, C, Ho, Wo)`` (the unfold matrix), a view."""
    (sh, sw), (dh, dw), (ho, wo), (kh, kw) = stride, dil, out_hw, ksize
    sb, sc, sy, sx = xp.stride()
    return xp.as_strided((b1 - b0, kh, kw, xp.shape[1], ho, wo), (sb, dh * sy, dw * sx, sc, sh * sy, sw * sx), xp.storage_offset() + b0 * sb)


def _mixed_rows(xp, maps, b0, b1, ksize, stride, dil, bufs) -> torch.Tensor:
    """Mixed taps of images ``b0:b1`` as the channels-last image ``(nb, kk*C, Ho, Wo)`` (rows ``(i, j, c)``):
    one ``mul`` channel-first into ``bufs[0]``, one transposing copy into ``bufs[1]``."""
    kh, kw = ksize
    nb, chans, (ho, wo) = b1 - b0, xp.shape[1], maps.shape[2:]
    z, rows = bufs[0][:nb], bufs[1][:nb]
    z6 = z.view(nb, kh, kw, chans, ho, wo)
    torch.mul(_taps_view_cf(xp, b0, b1, stride, dil, (ho, wo), ksize), maps[b0:b1].view(nb, kh, kw, 1, ho, wo), out=z6)
    rows.copy_(z.view(nb, -1, ho * wo).transpose(1, 2))
    return rows.view(nb, ho, wo, -1).permute(0, 3, 1, 2)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which a sum over chunks is accumulated: fp32 for bf16 / fp16, ``dtype`` otherwise."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
