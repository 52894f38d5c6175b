"""The neural-similarity convolution ``f_M(W, X) = W^T M X`` as a function: :func:`ns_conv2d` (chooses how
a dynamic similarity is applied) and :func:`ns_conv_reference` (literal, on unfold patches).

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

The three applications of a dynamic similarity live beside their autograd Functions:
:mod:`fewshot_nsl.nn.sides` (``"input"``, ``"output"``) and :mod:`fewshot_nsl.nn.taps` (``"taps"``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .geometry import IntPair, Padding, _pair, _tap_slices, conv_output_size, resolve_padding
from .sides import dns_input_side_cpu, input_side, output_side
from .taps import taps_conv

__all__ = ["ns_conv2d", "ns_conv_reference", "choose_side", "SIDES"]

#: Application sides of a dynamic similarity (see :func:`ns_conv2d`).
SIDES = ("auto", "input", "output", "taps")
#: Eager CPU: a dynamic DNS similarity on the ``"input"`` side runs :func:`~fewshot_nsl.nn.sides.dns_input_side_cpu`
#: (one ``mul`` and one oneDNN convolution per chunk of images), and ``side="auto"`` takes that side for every
#: DNS layer (issue 29). ``False`` restores the earlier rules (per-tap GEMMs for wide stride-1 layers).
CPU_FUSED_DNS = True
#: Under ``torch.compile`` on CPU (where :func:`~fewshot_nsl.nn.sides.dns_input_side_cpu` is not used),
#: ``side="auto"`` picks ``"taps"`` for DNS, stride 1 and at least this many input channels: below it the
#: per-tap GEMMs have too short an inner dimension (the RGB stem, ``C_in = 3``, was 3x slower).
TAPS_MIN_CHANNELS = 16
#: ... and when the padded map has at most this many positions per output (the taps side computes
#: every padded position): 1.12 at 42x42, 1.25 at 21x21, 1.56 at 10x10, where the input side was
#: faster for 128 channels (benchmarks/RESULTS.md, 2026-12-03).
TAPS_MAX_POSITION_RATIO = 1.5


def choose_side(
    kind: str,
    device_type: str,
    channels: Tuple[int, int],
    stride: Tuple[int, int],
    out_hw: Tuple[int, int],
    padded_positions: int,
    read_hw: Tuple[int, int],
) -> str:
    """The side ``side="auto"`` applies a dynamic similarity with, by device.

    * CPU, eager (with :data:`CPU_FUSED_DNS`; measured on a loaded 2-core CPU, issue 29, commit messages):
      ``"input"`` for every DNS layer, at any stride: there the input side is
      :func:`~fewshot_nsl.nn.sides.dns_input_side_cpu` (one ``mul`` and one oneDNN convolution per chunk
      of images), faster than the taps side's per-tap GEMMs and the earlier input side on every CNN-4
      map (1 thread, forward + backward, batch 64, min of 9-11, ms, before -> now: 3x84x84 193 -> 89
      (input), 3x42x42 32 -> 16 (input), 32x42x42 134 -> 113 (taps), 32x21x21 37 -> 30 (taps),
      32x10x10 10.9 -> 7.4 (input/taps), 32x5x5 4.1 -> 2.2 (input)).
    * CPU under ``torch.compile`` (no eager fast path in a compiled graph), or without
      :data:`CPU_FUSED_DNS`: ``"taps"`` for DNS at stride
      1 with ``C_in >= TAPS_MIN_CHANNELS`` on maps whose padded size is at most
      ``TAPS_MAX_POSITION_RATIO`` times the output's (measured eager before issue 29, when the taps side
      was the fastest there); otherwise as below.
    * Every other device (CUDA): never ``"taps"`` (``kk`` GEMMs with inner dimension ``C_in`` and
      ``5 * kk`` kernels in its backward, where the other sides launch one GEMM and ``kk`` element-wise
      kernels, which ``torch.compile`` fuses into one); the side whose ``kk``-fold tensor is smaller
      (``C_in * L`` for ``"input"``, whose single GEMM has the largest inner dimension, ``kk * C_in``;
      ``C_out * Hu * Wu`` for ``"output"``), ``"input"`` on ties and for strided layers. This rule
      follows kernel counts and GEMM shapes and is **not yet measured on a GPU**
      (``python benchmarks/measure_sides.py [--compile]`` measures it); ``side: taps`` stays available
      there explicitly (it never builds a ``kk``-fold tensor, so it saves memory).

    Args:
        kind: ``"dns"`` or ``"uns"`` (dynamic).
        device_type: ``x.device.type``.
        channels: ``(C_in, C_out)``.
        stride: ``(sh, sw)``.
        out_hw: ``(Ho, Wo)``.
        padded_positions: positions the taps side computes, ``(H + pad_t + pad_b + 1) * (W + pad_l + pad_r)``.
        read_hw: ``(Hu, Wu)``, rows and columns of the padded input any tap reads.

    Returns:
        ``"input"``, ``"output"`` or ``"taps"``.
    """
    (c_in, c_out), (ho, wo), (hu, wu) = channels, out_hw, read_hw
    if device_type == "cpu" and kind == "dns":
        if CPU_FUSED_DNS and not torch.compiler.is_compiling():
            return "input"
        if stride == (1, 1) and c_in >= TAPS_MIN_CHANNELS and padded_positions <= TAPS_MAX_POSITION_RATIO * ho * wo:
            return "taps"
    return "input" if c_in * ho * wo <= c_out * hu * wu else "output"


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
    :func:`torch.nn.functional.conv2d`. A per-location (dynamic) ``M_s(l)`` cannot be folded; three
    equivalent formulations are implemented. All do the plain conv's multiply-adds as GEMMs plus an
    element-wise term, read the ``kk`` taps as strided slices of the padded input (never the raw
    ``(B, C_in * kk, L)`` unfold matrix), and use hand-written backwards that accumulate the taps'
    gradients into one buffer (autograd through ``kk`` slices would allocate a zero-filled
    full-size gradient per tap):

    * ``side="input"`` (:func:`~fewshot_nsl.nn.sides.input_side`; DNS in eager CPU code
      :func:`~fewshot_nsl.nn.sides.dns_input_side_cpu`, the same values in one ``mul`` and one oneDNN
      convolution per chunk of images): mix the taps,
      ``X'_p(l) = sum_q M_s(l)[p, q] X_q(l)`` (DNS: ``m_p(l) X_p(l)``), then
      ``out = W_(O x kk*C_in) @ X'`` (one batched GEMM). Element-wise cost ``kk * C_in * L`` (DNS)
      or ``kk^2 * C_in * L`` (UNS); keeps ``X'`` (``kk * C_in * L`` values) for the weight gradient.
    * ``side="output"`` (:func:`~fewshot_nsl.nn.sides.output_side`): apply every weight tap at every
      input position first, ``Y_p = W[:, :, p] x`` (one GEMM to ``kk * C_out`` maps), then
      ``out(l) = sum_{p,q} M_s(l)[p, q] Y_p(l + tap q)`` (DNS: ``sum_p m_p(l) Y_p(l + tap p)``).
      Element-wise cost ``kk * C_out * L`` (DNS) or ``kk^2 * C_out * L`` (UNS); keeps ``Y``
      (``kk * C_out * H_pad * W_pad`` values); with stride ``s`` its GEMM costs ``s^2`` times more.
    * ``side="taps"`` (DNS, stride 1; :func:`~fewshot_nsl.nn.taps.taps_conv`):
      ``out(l) = sum_p m_p(l) (W[:, :, p] x)(l + tap p)``, one small GEMM per tap and cache-sized
      block of positions, accumulated at once, on the channels-last input flattened with its padded
      width (no ``kk``-fold tensor is ever made). The plain conv's multiply-adds in the forward,
      twice them in the backward, plus ``kk`` element-wise ops per block; saves only the padded
      input and the maps.
    * ``side="auto"``: by device, :func:`choose_side` (on CPU ``"taps"`` for wide DNS layers at
      stride 1, else the side with the smaller ``kk``-fold tensor; on a GPU never ``"taps"``).

    Every side traces into one graph under ``torch.compile`` (no graph break; the taps side runs as
    one block there), and runs in the autocast dtype inside ``torch.autocast``
    (:mod:`fewshot_nsl.nn.amp`). The output has the memory format of ``x`` (channels-last in,
    channels-last out, as :func:`torch.nn.functional.conv2d` on CPU), so the BatchNorm, ReLU and
    max-pool after the layer take the same fast path as after a plain conv.

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
        ``(B, C_out, H_out, W_out)``; in the autocast dtype inside an autocast region, as a conv.
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
    # Rows/cols of the padded input that any tap reads (crops what a stride leaves unused).
    hu = dil[0] * (ksize[0] - 1) + strd[0] * (ho - 1) + 1
    wu = dil[1] * (ksize[1] - 1) + strd[1] * (wo - 1) + 1
    if side == "auto":
        padded = (x.shape[2] + pads[2] + pads[3] + 1) * (x.shape[3] + pads[0] + pads[1])
        side = choose_side(kind, x.device.type, (c_in, c_out), strd, (ho, wo), padded, (hu, wu))
    if side == "input" and kind == "dns" and CPU_FUSED_DNS and x.device.type == "cpu" and not torch.compiler.is_compiling():
        out = dns_input_side_cpu(x, weight, bias, m, strd, pads, dil, (ho, wo))  # bias included
        return out.contiguous(memory_format=layout)
    if side == "taps":
        out = taps_conv(x, weight, m, ksize, dil, pads, (ho, wo))  # a view with the padded row stride
        if bias is not None:
            out = out + bias.to(out.dtype).view(1, -1, 1, 1)  # one pass into dense channels-last strides
        return out.contiguous(memory_format=layout)
    xp = F.pad(x, pads) if any(pads) else x
    if xp.shape[2] != hu or xp.shape[3] != wu:
        xp = xp[:, :, :hu, :wu]
    taps = _tap_slices(ksize, strd, dil, (ho, wo))
    # Channel-first maps (B, kk, Ho, Wo) / (B, kk, kk, Ho, Wo); free when m came from NSConv2d.similarity().
    if kind == "dns":
        maps = m.transpose(1, 2).reshape(batch, kk, ho, wo)
    else:
        maps = m.permute(0, 2, 3, 1).reshape(batch, kk, kk, ho, wo)
    maps = maps.to(x.dtype).contiguous()  # one dtype for the fused in-place ops
    out = (input_side if side == "input" else output_side)(xp, weight, maps, taps)
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, -1, 1, 1)  # the conv's dtype under autocast, as nn.Conv2d
    return out.contiguous(memory_format=layout)


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
