"""The ``side="taps"`` application of a dynamic DNS similarity (stride 1) and its autograd Function.

``out(l) = sum_p m_p(l) (W[:, :, p] x)(l + tap p)``: one GEMM per kernel tap on the channels-last
input flattened with its padded width (every tap's input is one contiguous block of rows), each
weighted by its similarity map and accumulated at once; no ``kk``-fold tensor is ever made. Called
by :func:`fewshot_nsl.nn.ns_conv_ops.ns_conv2d`, which chooses the side.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

from .amp import AUTOCAST_DTYPE, autocast_args, autocast_backward, autocast_forward

__all__ = ["taps_conv", "TAPS_CHUNK_BYTES", "TAPS_MAX_CHUNK_BYTES"]

#: Bytes of one ``(positions, channels)`` operand of the ``"taps"`` side on CPU with one thread;
#: positions go in blocks of about this size so that a block's operands stay in the L2 cache. With
#: ``t`` intra-op threads the block is ``t**2`` times larger (at most ``TAPS_MAX_CHUNK_BYTES``), so
#: that its element-wise ops still split across the threads: best of 128 KiB-1 MiB was 128 KiB at
#: one thread and 512 KiB at two (benchmarks/RESULTS.md, 2026-12-03). On a GPU, and while
#: ``torch.compile`` traces (the compiler tiles the loops itself), one block is the whole tensor.
TAPS_CHUNK_BYTES = 1 << 17
TAPS_MAX_CHUNK_BYTES = 1 << 24


def taps_conv(
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

    Args:
        x: input ``(B, C_in, H, W)``.
        weight: ``(C_out, C_in, kh, kw)``.
        m: the DNS similarity, ``(B, L, kk)``.
        ksize: ``(kh, kw)``.
        dil: ``(dh, dw)``.
        pads: explicit ``(left, right, top, bottom)`` padding.
        out_hw: ``(Ho, Wo)``, ``L = Ho * Wo``.

    Returns:
        ``(B, C_out, Ho, Wo)`` in the dtype :class:`_AccumulateTaps` ran in (the autocast dtype inside
        an autocast region).
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
    args = autocast_args(AUTOCAST_DTYPE, xf, wtaps, maps.reshape(batch * rows * wp, kk), offs, used)
    out = _AccumulateTaps.apply(*args)  # (B * P, C_out)
    return out.view(batch, rows, wp, c_out)[:, :ho, :wo].permute(0, 3, 1, 2)


def _position_blocks(used: int, width: int, like: torch.Tensor) -> List[Tuple[int, int]]:
    """``[(q0, q1), ...]`` covering ``range(used)``: one block on a GPU and under ``torch.compile``; on CPU
    ``(q1 - q0, width)`` blocks of about ``TAPS_CHUNK_BYTES * threads**2`` bytes (see there)."""
    if like.device.type != "cpu" or torch.compiler.is_compiling():
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

    Autocast: runs in the region's autocast dtype (one dtype for the ``out=`` GEMMs and in-place
    accumulations, as the conv it generalises); the weight gradient, a sum over every position, is
    accumulated in fp32 when that dtype is bf16 or fp16 (:func:`_accumulator`).
    """

    @staticmethod
    @autocast_forward(AUTOCAST_DTYPE)
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
    @autocast_backward
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
        gw = torch.zeros_like(wtaps, dtype=_accumulator(wtaps.dtype)) if want_w else None
        # Traced, the maps' gradient is made as (kk, Q), one contiguous row per tap: dynamo traces no `out=`
        # into a column view. Eager it stays (Q, kk) (the reduction writing a column keeps its rounding).
        by_tap = torch.compiler.is_compiling()
        gm = maps.new_empty(maps.shape[::-1] if by_tap else maps.shape) if want_m else None
        if gm is not None:
            (gm[:, used:] if by_tap else gm[used:]).zero_()
        gz = u = prod = xf.new_empty((0,))
        for q0, q1 in _position_blocks(used, max(c_in, c_out), xf):
            g, rows = grad[q0:q1], q1 - q0
            if u.shape[:1] != (rows,):
                gz, u, prod = xf.new_empty((rows, c_out)), xf.new_empty((rows, c_in)), xf.new_empty((rows, c_in))
            for p, off in enumerate(offs):
                xs, mp = xf[q0 + off:q1 + off], maps[q0:q1, p:p + 1]
                if gw is not None:
                    torch.mul(g, mp, out=gz)
                    if gw.dtype == gz.dtype:
                        gw[p].addmm_(xs.t(), gz)
                    else:  # a low-precision GEMM per block, summed over the blocks in fp32
                        gw[p].add_(torch.mm(xs.t(), gz))
                if gx is None and gm is None:
                    continue
                torch.mm(g, wback[p], out=u)
                if gm is not None:
                    torch.sum(torch.mul(xs, u, out=prod), 1, out=gm[p, q0:q1] if by_tap else gm[q0:q1, p])
                if gx is not None:
                    gx[q0 + off:q1 + off].addcmul_(u, mp)
        return gx, gw, (gm.t() if gm is not None and by_tap else gm), None, None


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which a sum over many blocks is accumulated: fp32 for bf16 / fp16, ``dtype`` otherwise."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


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
