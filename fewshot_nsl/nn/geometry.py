"""Convolution geometry shared by the layers: int-or-pair arguments, explicit padding, output sizes, tap slices.

Index conventions (used by every module of :mod:`fewshot_nsl.nn`): kernel taps are flattened
row-major, tap ``p = i * kw + j`` is kernel row ``i``, column ``j``; output locations ``l`` (``L =
H_out * W_out`` of them) are row-major too.
"""
from __future__ import annotations

from typing import List, Tuple, Union

from ..errors import ConfigError

IntPair = Union[int, Tuple[int, int]]
Padding = Union[int, Tuple[int, int], str]

__all__ = ["IntPair", "Padding", "resolve_padding", "conv_output_size"]


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
