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

from typing import Callable, List, Tuple

import torch

from .amp import AUTOCAST_DTYPE, autocast_args, autocast_backward, autocast_forward

__all__ = ["input_side", "output_side"]

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
