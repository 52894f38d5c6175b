"""Functional forms of the neural-similarity convolution ``f_M(W, X) = W^T M X`` and of SphereConv.

Notation used throughout the package:

* ``x``: input ``(B, C_in, H, W)``; ``weight``: ``(C_out, C_in, kh, kw)``; ``kk = kh * kw``.
* Kernel taps are flattened row-major: tap ``p = i * kw + j`` is kernel row ``i``, column ``j``.
* For an output location ``l`` (``L = H_out * W_out`` of them, row-major) the input patch is
  ``X[c, q] = x_padded[c, l_row * stride + i_q * dilation, l_col * stride + j_q * dilation]``.
* The layer computes ``out[o, l] = sum_c sum_{p,q} W[o, c, p] M_s[p, q] X[c, q] (+ bias[o])``,
  i.e. ``M = diag(M_s, ..., M_s)`` with one ``kk x kk`` block per input channel (paper, Eq. 2).

Similarity layouts accepted by :func:`ns_conv2d` and :func:`ns_conv_reference`:

* static: ``(kk,)`` (diagonal, DNS) or ``(kk, kk)`` (full, UNS);
* dynamic DNS: ``(B, L, kk)``, the diagonal of ``M_s`` at every output location;
* dynamic UNS: ``(B, L, kk, kk)``, ``M_s`` at every output location (``[..., p, q]``).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..errors import ConfigError

IntPair = Union[int, Tuple[int, int]]
Padding = Union[int, Tuple[int, int], str]

#: Application sides of a dynamic similarity (see :func:`ns_conv2d`).
SIDES = ("auto", "input", "output", "taps")
#: ``side="auto"`` picks ``"taps"`` for DNS, stride 1 and at least this many input channels: below
#: it the per-tap GEMMs have too short an inner dimension (the RGB stem, ``C_in = 3``, was 3x slower).
TAPS_MIN_CHANNELS = 16
#: ... and when the padded map has at most this many positions per output (the taps side computes
#: every padded position): 1.12 at 42x42, 1.25 at 21x21, 1.56 at 10x10, where the input side was
#: faster for 128 channels (benchmarks/RESULTS.md, 2026-12-03).
TAPS_MAX_POSITION_RATIO = 1.5
#: Bytes of one ``(positions, channels)`` operand of the ``"taps"`` side on CPU with one thread;
#: positions go in blocks of about this size so that a block's operands stay in the L2 cache. With
#: ``t`` intra-op threads the block is ``t**2`` times larger (at most ``TAPS_MAX_CHUNK_BYTES``), so
#: that its element-wise ops still split across the threads: best of 128 KiB-1 MiB was 128 KiB at
#: one thread and 512 KiB at two (benchmarks/RESULTS.md, 2026-12-03). On a GPU one block is the
#: whole tensor.
TAPS_CHUNK_BYTES = 1 << 17
TAPS_MAX_CHUNK_BYTES = 1 << 24

__all__ = [
    "ns_conv2d",
    "ns_conv_reference",
    "sphere_conv2d",
    "input_normalized_conv2d",
    "resolve_padding",
    "conv_output_size",
]


def _pair(value: IntPair, name: str) -> Tuple[int, int]:
    """``3 -> (3, 3)``; ``(3, 5) -> (3, 5)``."""
    if isinstance(value, int):
        return (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ConfigError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def resolve_padding(
    padding: Padding, kernel_size: IntPair, dilation: IntPair = 1, stride: IntPair = 1
) -> Tuple[int, int, int, int]:
    """Explicit ``(left, right, top, bottom)`` zero padding, as :class:`torch.nn.Conv2d` would use.

    Args:
        padding: an int, an ``(ph, pw)`` pair, ``"valid"`` or ``"same"`` (stride 1 only; for an
            even receptive field the extra row/column goes to the bottom/right, like PyTorch).
        kernel_size: ``k`` or ``(kh, kw)``.
        dilation: ``d`` or ``(dh, dw)``.
        stride: ``s`` or ``(sh, sw)``.

    Returns:
        The four paddings in :func:`torch.nn.functional.pad` order.
    """
    kh, kw = _pair(kernel_size, "kernel_size")
    dh, dw = _pair(dilation, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if _pair(stride, "stride") != (1, 1):
                raise ConfigError("padding='same' needs stride=1 (as in torch.nn.Conv2d); give explicit padding")
            th, tw = dh * (kh - 1), dw * (kw - 1)
            return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        raise ConfigError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = _pair(padding, "padding")
    return (pw, pw, ph, ph)


def conv_output_size(
    size: Tuple[int, int],
    kernel_size: IntPair,
    stride: IntPair,
    pads: Tuple[int, int, int, int],
    dilation: IntPair,
) -> Tuple[int, int]:
    """``(H_out, W_out)`` of a convolution on an ``(H, W)`` input with explicit ``pads`` (l, r, t, b)."""
    (kh, kw), (sh, sw), (dh, dw) = _pair(kernel_size, "k"), _pair(stride, "s"), _pair(dilation, "d")
    h = (size[0] + pads[2] + pads[3] - dh * (kh - 1) - 1) // sh + 1
    w = (size[1] + pads[0] + pads[1] - dw * (kw - 1) - 1) // sw + 1
    return h, w


def _tap_slices(
    kernel_size: Tuple[int, int], stride: Tuple[int, int], dilation: Tuple[int, int], out_hw: Tuple[int, int]
) -> List[Tuple[slice, slice]]:
    """For each tap ``p`` the (row, col) slices of the padded input read at that tap, ``kk`` entries."""
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel_size, stride, dilation, out_hw
    return [
        (slice(i * dh, i * dh + sh * (ho - 1) + 1, sh), slice(j * dw, j * dw + sw * (wo - 1) + 1, sw))
        for i in range(kh)
        for j in range(kw)
    ]


def _check_similarity(m: torch.Tensor, kk: int, batch: int, locations: int) -> str:
    """Classify ``m`` as ``"static_dns"``, ``"static_uns"``, ``"dns"`` or ``"uns"`` and check its shape."""
    shapes = {
        1: ("static_dns", (kk,)),
        2: ("static_uns", (kk, kk)),
        3: ("dns", (batch, locations, kk)),
        4: ("uns", (batch, locations, kk, kk)),
    }
    if m.dim() not in shapes or tuple(m.shape) != shapes[m.dim()][1]:
        raise ValueError(
            f"similarity must be (kk,), (kk, kk), (B, L, kk) or (B, L, kk, kk) with kk={kk}, "
            f"B={batch}, L={locations}; got {tuple(m.shape)}"
        )
    return shapes[m.dim()][0]


def _static_weight(weight: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Effective weight ``W'[o, c, q] = sum_p W[o, c, p] M_s[p, q]`` (``M_s^T W`` in the paper), same shape as ``weight``."""
    if m.dim() == 1:
        return weight * m.view(1, 1, *weight.shape[2:])
    flat = weight.flatten(2)  # (O, C, kk)
    return torch.matmul(flat, m).view_as(weight)


def ns_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    m: torch.Tensor,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    side: str = "auto",
) -> torch.Tensor:
    """Neural-similarity convolution ``W^T diag(M_s, ..., M_s) X`` without materialising unfold patches.

    Static ``M_s`` is folded into the weight (``W' = M_s^T W``) and applied with one
    :func:`torch.nn.functional.conv2d`. A per-location (dynamic) ``M_s(l)`` cannot be folded; two
    equivalent formulations are implemented. Both do the plain conv's multiply-adds as one GEMM
    plus an element-wise term, read the ``kk`` taps as strided slices of the padded input (never
    the raw ``(B, C_in * kk, L)`` unfold matrix), and use hand-written backwards that accumulate
    the taps' gradients into one buffer (autograd through ``kk`` slices would allocate a
    zero-filled full-size gradient per tap):

    * ``side="input"``: mix the taps, ``X'_p(l) = sum_q M_s(l)[p, q] X_q(l)`` (DNS:
      ``m_p(l) X_p(l)``), then ``out = W_(O x kk*C_in) @ X'`` (one batched GEMM). Element-wise cost ``kk * C_in * L``
      (DNS) or ``kk^2 * C_in * L`` (UNS); keeps ``X'`` (``kk * C_in * L`` values) for the
      weight gradient.
    * ``side="output"``: apply every weight tap at every input position first,
      ``Y_p = W[:, :, p] x`` (one GEMM to ``kk * C_out`` maps), then
      ``out(l) = sum_{p,q} M_s(l)[p, q] Y_p(l + tap q)`` (DNS: ``sum_p m_p(l) Y_p(l + tap p)``).
      Element-wise cost ``kk * C_out * L`` (DNS) or ``kk^2 * C_out * L`` (UNS); keeps ``Y``
      (``kk * C_out * H_pad * W_pad`` values); with stride ``s`` its GEMM costs ``s^2`` times more.
    * ``side="taps"`` (DNS, stride 1): ``out(l) = sum_p m_p(l) (W[:, :, p] x)(l + tap p)``, one
      small GEMM per tap and cache-sized block of positions, accumulated at once, on the
      channels-last input flattened with its padded width (every tap's input is one contiguous
      block of rows and no ``kk``-fold tensor is ever made; see :func:`_taps_conv` and
      :class:`_AccumulateTaps`). The plain conv's multiply-adds in the forward, twice them in the
      backward, plus ``kk`` element-wise ops per block; saves only the padded input and the maps.
    * ``side="auto"``: ``"taps"`` for DNS at stride 1 with ``C_in >= TAPS_MIN_CHANNELS`` on maps whose
      padded size is at most ``TAPS_MAX_POSITION_RATIO`` times the output's, except while
      ``torch.compile`` traces (its Python loop over position blocks would be unrolled); otherwise
      the side whose ``kk``-fold tensor is smaller (``C_in * L`` vs ``C_out * H_pad * W_pad``); the
      input side on ties, for the RGB stem and for strided layers.

    The output has the memory format of ``x`` (channels-last in, channels-last out, as
    :func:`torch.nn.functional.conv2d` on CPU), so the BatchNorm, ReLU and max-pool after the layer
    take the same fast path as after a plain conv.

    Args:
        x: input ``(B, C_in, H, W)``.
        weight: ``(C_out, C_in, kh, kw)``.
        bias: ``(C_out,)`` or ``None``.
        m: similarity, ``(kk,)``, ``(kk, kk)``, ``(B, L, kk)`` or ``(B, L, kk, kk)`` (see module doc).
        stride: conv stride.
        padding: int, pair, ``"same"`` or ``"valid"``.
        dilation: conv dilation.
        side: ``"auto"``, ``"input"``, ``"output"`` or ``"taps"`` (dynamic ``m`` only; ``"taps"`` needs
            DNS and stride 1).

    Returns:
        ``(B, C_out, H_out, W_out)``.
    """
    if weight.dim() != 4 or x.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected x (B, C, H, W) and weight (O, C, kh, kw); got {tuple(x.shape)}, {tuple(weight.shape)}")
    if side not in SIDES:
        raise ConfigError(f"side must be one of {', '.join(SIDES)}, got {side!r}")
    ksize = (int(weight.shape[2]), int(weight.shape[3]))
    kk = ksize[0] * ksize[1]
    strd, dil = _pair(stride, "stride"), _pair(dilation, "dilation")
    pads = resolve_padding(padding, ksize, dil, strd)
    ho, wo = conv_output_size((x.shape[2], x.shape[3]), ksize, strd, pads, dil)
    kind = _check_similarity(m, kk, x.shape[0], ho * wo)
    if kind.startswith("static"):
        if isinstance(padding, str):
            return F.conv2d(F.pad(x, pads), _static_weight(weight, m), bias, strd, 0, dil)
        return F.conv2d(x, _static_weight(weight, m), bias, strd, _pair(padding, "padding"), dil)

    batch, c_in = x.shape[:2]
    c_out = weight.shape[0]
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format  # of the output, as conv2d
    if side == "taps" and (kind != "dns" or strd != (1, 1)):
        raise ConfigError(f"side='taps' needs a DNS similarity and stride 1 (got {kind.upper()}, stride {strd}); use side='auto'")
    padded = (x.shape[2] + pads[2] + pads[3] + 1) * (x.shape[3] + pads[0] + pads[1])
    if side == "taps" or (
        side == "auto" and kind == "dns" and strd == (1, 1) and c_in >= TAPS_MIN_CHANNELS
        and padded <= TAPS_MAX_POSITION_RATIO * ho * wo
        and not torch.compiler.is_compiling()  # its block loop would be unrolled into the graph
    ):
        out = _taps_conv(x, weight, m, ksize, dil, pads, (ho, wo))  # a view with the padded row stride
        if bias is not None:
            out = out + bias.view(1, -1, 1, 1)  # one pass into dense channels-last strides
        return out.contiguous(memory_format=layout)
    # Rows/cols of the padded input that any tap reads (crops what a stride leaves unused).
    hu = dil[0] * (ksize[0] - 1) + strd[0] * (ho - 1) + 1
    wu = dil[1] * (ksize[1] - 1) + strd[1] * (wo - 1) + 1
    xp = F.pad(x, pads) if any(pads) else x
    if xp.shape[2] != hu or xp.shape[3] != wu:
        xp = xp[:, :, :hu, :wu]
    taps = _tap_slices(ksize, strd, dil, (ho, wo))
    if side == "auto":
        side = "input" if c_in * ho * wo <= c_out * hu * wu else "output"
    # Channel-first maps (B, kk, Ho, Wo) / (B, kk, kk, Ho, Wo); free when m came from NSConv2d.similarity().
    if kind == "dns":
        maps = m.transpose(1, 2).reshape(batch, kk, ho, wo)
    else:
        maps = m.permute(0, 2, 3, 1).reshape(batch, kk, kk, ho, wo)
    maps = maps.to(x.dtype).contiguous()  # one dtype for the fused in-place ops (autocast may mix them)

    if side == "input":
        mixed = _MixInputTaps.apply(xp, maps, taps)  # (B, kk, C_in, Ho, Wo)
        w1 = weight.permute(0, 2, 3, 1).reshape(c_out, kk * c_in)  # tap-major, matches `mixed`
        # bmm on an expanded weight: no layout copies (matmul(2-D, 3-D) transposes the 3-D operand).
        out = torch.bmm(w1.expand(batch, -1, -1), mixed.view(batch, kk * c_in, ho * wo)).view(batch, c_out, ho, wo)
    else:
        wt = weight.permute(2, 3, 0, 1).reshape(kk * c_out, c_in)
        y = torch.bmm(wt.expand(batch, -1, -1), xp.reshape(batch, c_in, hu * wu)).view(batch, kk, c_out, hu, wu)
        out = _GatherOutputTaps.apply(y, maps.to(y.dtype), taps)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out.contiguous(memory_format=layout)


def _taps_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    m: torch.Tensor,
    ksize: Tuple[int, int],
    dil: Tuple[int, int],
    pads: Tuple[int, int, int, int],
    out_hw: Tuple[int, int],
) -> torch.Tensor:
    """The ``side="taps"`` DNS application at stride 1, without bias: ``(B, C_out, Ho, Wo)``, a strided view.

    The padded input is laid out channels-last and flattened over ``(image, row, col)``: ``xf
    (B * P, C_in)``, ``P = rows * Wp`` with ``Wp`` the padded width. Output ``(b, r, c)`` is computed
    at flat position ``q = b * P + r * Wp + c``, and tap ``p = (i, j)`` of every position reads row
    ``q + off_p`` of ``xf``, ``off_p = i * dh * Wp + j * dw``: for a block of positions, one
    contiguous block of rows, for the whole batch at once. Positions that are not outputs (the
    ``Wp - Wo`` columns past ``Wo``, the rows past ``Ho``) are computed and dropped; their maps are
    zero, so the values they read (padding, or the next row or image) contribute nothing to the
    output or to any gradient. One extra zero row per image keeps the last tap of the last image in
    the buffer.
    """
    (kh, kw), (dh, dw), (ho, wo) = ksize, dil, out_hw
    batch, c_in = x.shape[:2]
    c_out, kk = weight.shape[0], kh * kw
    extra = 1 if kw > 1 else 0  # the last tap reads (kw - 1) * dw <= Wp positions past the padded map
    xp = F.pad(x, (pads[0], pads[1], pads[2], pads[3] + extra))
    rows, wp = xp.shape[2], xp.shape[3]
    xf = xp.permute(0, 2, 3, 1).reshape(batch * rows * wp, c_in)  # a view when x is channels-last
    wtaps = weight.permute(2, 3, 1, 0).reshape(kk, c_in, c_out)  # wtaps[p] = W[:, :, p]^T
    maps = F.pad(m.to(x.dtype).reshape(batch, ho, wo, kk), (0, 0, 0, wp - wo, 0, rows - ho))
    offs = [i * dh * wp + j * dw for i in range(kh) for j in range(kw)]
    used = (batch - 1) * rows * wp + ho * wp  # positions up to the last output row of the last image
    out = _AccumulateTaps.apply(xf, wtaps, maps.reshape(batch * rows * wp, kk), offs, used)  # (B * P, C_out)
    return out.view(batch, rows, wp, c_out)[:, :ho, :wo].permute(0, 3, 1, 2)


def _position_blocks(used: int, width: int, like: torch.Tensor) -> List[Tuple[int, int]]:
    """``[(q0, q1), ...]`` covering ``range(used)``: one block on a GPU; on CPU ``(q1 - q0, width)`` blocks of
    about ``TAPS_CHUNK_BYTES * threads**2`` bytes (see there)."""
    if like.device.type != "cpu":
        return [(0, used)]
    budget = min(TAPS_CHUNK_BYTES * torch.get_num_threads() ** 2, TAPS_MAX_CHUNK_BYTES)
    per = max(1, budget // max(1, width * like.element_size()))
    return [(q0, min(used, q0 + per)) for q0 in range(0, used, per)]


class _AccumulateTaps(torch.autograd.Function):
    """``out[q] = sum_p maps[q, p] * (xf[q + off_p] @ wtaps[p])`` for ``q < used``: ``(Q, C_out)``, ``Q = maps.shape[0]``.

    Inputs: ``xf (Q, C_in)``, ``wtaps (kk, C_in, C_out)``, ``maps (Q, kk)``, ``offs`` (``kk`` ints with
    ``used + off_p <= Q``), ``used``. Rows ``>= used`` of the output (and of the maps' gradient) are
    zero. Positions go in blocks (:func:`_position_blocks`), so every operand of a block stays in the
    L2 cache; within a block each tap is one GEMM into a reused buffer and one
    ``addcmul_``. Saved for the backward: the inputs only (no ``kk``-fold tensor). The backward, per
    block and tap: ``gz = g * m_p``, ``dW_p += xs_p^T gz``, ``u = g W_p^T``, ``dm_p = <xs_p, u>``
    (row-wise), ``dxs_p += m_p * u``; under ``create_graph`` it runs in differentiable ops instead
    (double backward).
    """

    @staticmethod
    def forward(ctx, xf: torch.Tensor, wtaps: torch.Tensor, maps: torch.Tensor, offs: List[int], used: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(xf, wtaps, maps)
        ctx.offs, ctx.used = offs, used
        c_in, c_out = wtaps.shape[1:]
        out = xf.new_empty((maps.shape[0], c_out))
        out[used:].zero_()
        z = xf.new_empty((0, c_out))
        for q0, q1 in _position_blocks(used, max(c_in, c_out), xf):
            o = out[q0:q1]
            if z.shape[0] != q1 - q0:
                z = xf.new_empty((q1 - q0, c_out))
            for p, off in enumerate(offs):
                torch.mm(xf[q0 + off:q1 + off], wtaps[p], out=z)
                if p == 0:
                    torch.mul(z, maps[q0:q1, 0:1], out=o)
                else:
                    o.addcmul_(z, maps[q0:q1, p:p + 1])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        xf, wtaps, maps = ctx.saved_tensors
        offs, used = ctx.offs, ctx.used
        if torch.is_grad_enabled():
            return _accumulate_taps_grads(xf, wtaps, maps, offs, used, grad, ctx.needs_input_grad)
        grad = grad.contiguous()
        c_in, c_out = wtaps.shape[1:]
        want_x, want_w, want_m = ctx.needs_input_grad[:3]
        wback = wtaps.transpose(1, 2).contiguous()  # (kk, C_out, C_in)
        gx = torch.zeros_like(xf) if want_x else None
        gw = torch.zeros_like(wtaps) if want_w else None
        gm = maps.new_empty(maps.shape) if want_m else None
        if gm is not None:
            gm[used:].zero_()
        gz = u = prod = xf.new_empty((0,))
        for q0, q1 in _position_blocks(used, max(c_in, c_out), xf):
            g, rows = grad[q0:q1], q1 - q0
            if u.shape[:1] != (rows,):
                gz, u, prod = xf.new_empty((rows, c_out)), xf.new_empty((rows, c_in)), xf.new_empty((rows, c_in))
            for p, off in enumerate(offs):
                xs, mp = xf[q0 + off:q1 + off], maps[q0:q1, p:p + 1]
                if gw is not None:
                    gw[p].addmm_(xs.t(), torch.mul(g, mp, out=gz))
                if gx is None and gm is None:
                    continue
                torch.mm(g, wback[p], out=u)
                if gm is not None:
                    torch.sum(torch.mul(xs, u, out=prod), 1, out=gm[q0:q1, p])
                if gx is not None:
                    gx[q0 + off:q1 + off].addcmul_(u, mp)
        return gx, gw, gm, None, None


def _accumulate_taps_grads(xf, wtaps, maps, offs, used, grad, needs):
    """The backward of :class:`_AccumulateTaps` in differentiable ops (used under ``create_graph``)."""
    positions = xf.shape[0]
    g = grad[:used]
    us = [g @ wtaps[p].t() for p in range(len(offs))]  # (used, C_in) each
    gx = gw = gm = None
    if needs[0]:
        gx = sum(F.pad(us[p] * maps[:used, p:p + 1], (0, 0, off, positions - off - used)) for p, off in enumerate(offs))
    if needs[1]:
        gw = torch.stack([xf[off:off + used].t() @ (g * maps[:used, p:p + 1]) for p, off in enumerate(offs)])
    if needs[2]:
        gm = F.pad(torch.stack([(xf[off:off + used] * us[p]).sum(1) for p, off in enumerate(offs)], 1), (0, 0, 0, positions - used))
    return gx, gw, gm, None, None


def _tap_pairs(
    taps: List[Tuple[slice, slice]], dns: bool, q_major: bool = False
) -> List[Tuple[int, int, slice, slice]]:
    """The entries ``(p, q)`` of ``M_s`` a similarity mixes, with tap ``q``'s ``(rows, cols)``.

    DNS: the ``kk`` pairs ``(p, p)``; UNS: all ``kk * kk`` pairs, ``p``-major (``q``-major with
    ``q_major``). The order is the order of accumulation, so it is part of the numbers.
    """
    kk = len(taps)
    if dns:
        return [(p, p, rs, cs) for p, (rs, cs) in enumerate(taps)]
    pairs = [(p, q) for q in range(kk) for p in range(kk)] if q_major else [(p, q) for p in range(kk) for q in range(kk)]
    return [(p, q) + taps[q] for p, q in pairs]


def _mixing_terms(
    taps: List[Tuple[slice, slice]], maps: torch.Tensor, q_major: bool = False
) -> List[Tuple[int, int, slice, slice, torch.Tensor]]:
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


def _similarity_grad(
    taps: List[Tuple[slice, slice]], dns: bool, product: Callable[[int, slice, slice], torch.Tensor]
) -> torch.Tensor:
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
    so double backward works.
    """

    @staticmethod
    def forward(ctx, xp: torch.Tensor, maps: torch.Tensor, taps: List[Tuple[slice, slice]]) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(xp, maps)
        ctx.taps = taps
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


class _GatherOutputTaps(torch.autograd.Function):
    """``out = sum_{p,q} M[:, p, q] * y[:, p, :, tap q]`` (DNS: ``sum_p m[:, p] * y[:, p, :, tap p]``): ``(B, O, Ho, Wo)``."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, maps: torch.Tensor, taps: List[Tuple[slice, slice]]) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(y, maps)
        ctx.taps = taps
        out = y.new_zeros((y.shape[0], y.shape[2]) + tuple(maps.shape[-2:]))
        for p, _, rs, cs, mpq in _mixing_terms(taps, maps):
            out.addcmul_(y[:, p, :, rs, cs], mpq)
        return out

    @staticmethod
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


def ns_conv_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    m: torch.Tensor,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
) -> torch.Tensor:
    """Literal ``W^T diag(M_s, ..., M_s) X`` on :func:`torch.nn.functional.unfold` patches (tests, benchmarks).

    Materialises the ``(B, C_in, kk, L)`` patch tensor, so memory grows ``kk``-fold; use
    :func:`ns_conv2d` in models.

    Args:
        x: ``(B, C_in, H, W)``.
        weight: ``(C_out, C_in, kh, kw)``.
        bias: ``(C_out,)`` or ``None``.
        m: ``(kk,)``, ``(kk, kk)``, ``(B, L, kk)`` or ``(B, L, kk, kk)``.
        stride: conv stride.
        padding: int, pair, ``"same"`` or ``"valid"``.
        dilation: conv dilation.

    Returns:
        ``(B, C_out, H_out, W_out)``.
    """
    ksize = (int(weight.shape[2]), int(weight.shape[3]))
    kk = ksize[0] * ksize[1]
    strd, dil = _pair(stride, "stride"), _pair(dilation, "dilation")
    pads = resolve_padding(padding, ksize, dil, strd)
    ho, wo = conv_output_size((x.shape[2], x.shape[3]), ksize, strd, pads, dil)
    batch, c_in = x.shape[:2]
    kind = _check_similarity(m, kk, batch, ho * wo)
    patches = F.unfold(F.pad(x, pads), ksize, dilation=dil, stride=strd).view(batch, c_in, kk, ho * wo)
    if kind == "static_dns":
        mixed = torch.einsum("pq,bcql->bcpl", torch.diag(m), patches)
    elif kind == "static_uns":
        mixed = torch.einsum("pq,bcql->bcpl", m, patches)
    elif kind == "dns":
        mixed = torch.einsum("blq,bcql->bcql", m, patches)
    else:
        mixed = torch.einsum("blpq,bcql->bcpl", m, patches)
    out = torch.einsum("ocp,bcpl->bol", weight.flatten(2), mixed).view(batch, -1, ho, wo)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


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
        ``(B, C_out, H_out, W_out)``, in ``x``'s memory format.

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
        ``(B, C_out, H_out, W_out)``, in ``x``'s memory format.
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
        if any(pads):
            x = F.pad(x, pads)
        num = F.conv2d(x, w_unit, None, stride, 0, dilation)
        ones = weight.new_ones((1, 1) + tuple(weight.shape[2:]))
        patch_sq = F.conv2d((x * x).sum(1, keepdim=True), ones, None, stride, 0, dilation).clamp_min(0.0)
        return num * torch.rsqrt(patch_sq + eps)
    conv_pad = (0, 0)
    if pads[0] == pads[1] >= 0 and pads[2] == pads[3] >= 0:
        conv_pad = (pads[2], pads[0])
    elif any(pads):  # asymmetric or cropping: pad the input itself
        x = F.pad(x, pads)
    if torch.compiler.is_compiling():
        return _sphere_conv_ops(x, w_unit, stride, conv_pad, eps)
    return _SphereConv.apply(x, w_unit, stride, conv_pad, eps)


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
    :func:`_sphere_conv_ops` instead (double backward).
    """

    @staticmethod
    def forward(ctx, x, w_unit, stride, conv_pad, eps):  # type: ignore[override]
        s = torch.rsqrt(_squared_patch_norms(x, tuple(w_unit.shape[2:]), stride, conv_pad) + eps)
        out = F.conv2d(x, w_unit, None, stride, conv_pad).mul_(s)
        ctx.save_for_backward(x, w_unit, s, out)
        ctx.stride, ctx.conv_pad, ctx.eps = stride, conv_pad, eps
        return out

    @staticmethod
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
