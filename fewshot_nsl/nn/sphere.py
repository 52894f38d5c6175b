"""SphereConv2d and the dynamic neural-similarity predictors (paper, Sec. 3.3).

The predictor of one NSConv2d layer maps the layer's input ``x (B, C_in, H, W)`` to the residual
of ``M_s`` at every output location, ``(B, n_maps, H_out, W_out)`` with ``n_maps = kk`` (DNS) or
``kk * kk`` (UNS)::

    [adapter 1x1 conv ->] conv1 3x3 (layer stride) -> BN -> ReLU -> conv2 3x3 -> bound -> gain

* ``kind="sphere"`` (the paper's choice): conv1 and conv2 are cosine convolutions, so the output
  already lies in ``(-1, 1)``; nothing else is applied.
* ``kind="cnn"``: plain convs; the paper notes a plain predictor needs "normalization (or sigmoid
  activation) to the predictor's final output" to converge. We use ``tanh``: it bounds the
  residual to ``(-1, 1)`` like SphereNet, is zero-centred (a zero pre-activation means ``M_s = I``)
  and has slope 1 at 0 (``2 * sigmoid(z) - 1 = tanh(z / 2)`` is the same map with half the slope).
* ``gain`` (``zero_init_residual=True``): the residual is multiplied by ``tanh(g)``, one learnable
  ``g`` per output map, initialised to 0. The layer then starts exactly as the plain conv (useful
  from pretrained weights), the residual stays within ``(-1, 1)``, and gradients stay alive:
  ``dL/dg = sum dL/dR * SphereNet(x)`` is non-zero at ``g = 0``, and conv1/conv2 receive gradient
  as soon as ``g`` moves. Zero-initialising the last *cosine* layer's weights instead would not
  work: the cosine is scale-invariant, so its gradient at ``w = 0`` is ``x / (sqrt(eps) ||x||)``,
  huge and direction-only.

``conv1`` (and ``conv2``) live in a :class:`PredictorCore`. With ``sharing="disjoint"`` every layer
owns its core. With ``sharing="shared"`` one core serves every layer with the same kernel size
and structure (paper, Sec. 3.3.2); each layer keeps its own adapter (1x1 conv from its
``C_in`` to the core's width), its own BatchNorm (statistics differ per layer) and its own gain.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError
from .functional import IntPair, _pair, sphere_conv2d

__all__ = ["SphereConv2d", "PredictorCore", "SimilarityPredictor"]

PREDICTOR_KINDS = ("sphere", "cnn")


class SphereConv2d(nn.Module):
    """Cosine convolution layer (no bias): output ``<w_o, X_l> / (||w_o|| ||X_l||)`` in ``(-1, 1)``.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        kernel_size: ``k`` or ``(kh, kw)``.
        stride: conv stride.
        padding: symmetric padding (int or pair).
        dilation: conv dilation.
        eps: added to the squared norms of patch and filter.

    Shape:
        ``(B, C_in, H, W)`` -> ``(B, C_out, H_out, W_out)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.padding, self.dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sphere_conv2d(x, self.weight, self.stride, self.padding, self.dilation, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, eps={self.eps}"
        )


class PredictorCore(nn.Module):
    """The two 3x3 layers of a similarity predictor; shareable across NSConv2d layers.

    Args:
        in_channels: channels it reads (the layer's ``C_in``, or the common adapter width when shared).
        hidden: channels between the two layers.
        out_maps: ``kk`` (DNS) or ``kk * kk`` (UNS).
        kind: ``"sphere"`` (cosine convs) or ``"cnn"`` (plain convs, final bias, ``tanh`` applied by the caller).
        eps: cosine-norm epsilon (sphere only).
    """

    def __init__(self, in_channels: int, hidden: int, out_maps: int, kind: str = "sphere", eps: float = 1e-4) -> None:
        super().__init__()
        if kind not in PREDICTOR_KINDS:
            raise ConfigError(f"predictor must be one of {', '.join(PREDICTOR_KINDS)}, got {kind!r}")
        self.in_channels, self.hidden, self.out_maps, self.kind, self.eps = in_channels, hidden, out_maps, kind, eps
        if kind == "sphere":
            self.conv1: nn.Module = SphereConv2d(in_channels, hidden, 3, eps=eps)
            self.conv2: nn.Module = SphereConv2d(hidden, out_maps, 3, padding=1, eps=eps)
        else:
            self.conv1 = nn.Conv2d(in_channels, hidden, 3, bias=False)
            self.conv2 = nn.Conv2d(hidden, out_maps, 3, padding=1)

    def first(self, x: torch.Tensor, stride: Tuple[int, int], pads: Tuple[int, int, int, int]) -> torch.Tensor:
        """conv1 with a per-call stride and explicit (possibly negative) ``(l, r, t, b)`` padding.

        Args:
            x: ``(B, in_channels, H, W)``.
            stride: the NSConv2d layer's stride.
            pads: padding giving the layer's output size.

        Returns:
            ``(B, hidden, H_out, W_out)``.
        """
        if self.kind == "sphere":
            return sphere_conv2d(x, self.conv1.weight, stride, pads, 1, self.eps)
        return nn.functional.conv2d(nn.functional.pad(x, pads), self.conv1.weight, None, stride)

    def second(self, h: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """conv2 (+ ``tanh`` for ``kind="cnn"``), times ``scale``.

        Args:
            h: ``(B, hidden, H_out, W_out)``.
            scale: optional ``(out_maps,)`` factor per map (a layer's ``tanh(gain)``); for
                ``kind="sphere"`` it is folded into the unit filters of the cosine conv.

        Returns:
            ``(B, out_maps, H_out, W_out)``, in ``(-1, 1)`` when ``|scale| < 1``.
        """
        if self.kind == "sphere":
            conv2 = self.conv2
            return sphere_conv2d(h, conv2.weight, conv2.stride, conv2.padding, conv2.dilation, self.eps, out_scale=scale)
        out = torch.tanh(self.conv2(h))
        return out if scale is None else out * scale.view(1, -1, 1, 1)


class SimilarityPredictor(nn.Module):
    """Per-layer predictor of the residual ``M_s(x) - I`` (see module doc).

    Args:
        in_channels: the NSConv2d layer's ``C_in``.
        out_maps: ``kk`` (DNS) or ``kk * kk`` (UNS).
        kernel_size: the layer's ``(kh, kw)``.
        stride: the layer's stride (applied by conv1).
        padding: the layer's explicit ``(l, r, t, b)`` padding.
        dilation: the layer's dilation.
        hidden: predictor width (ignored when ``core`` is given).
        kind: ``"sphere"`` or ``"cnn"`` (ignored when ``core`` is given).
        core: a shared :class:`PredictorCore`; then a 1x1 adapter ``in_channels -> core.in_channels`` is added.
        zero_init_residual: multiply the residual by ``tanh(gain)``, ``gain`` initialised to 0 (starts at ``M_s = I``).
        bn_eps: BatchNorm epsilon (1e-3 as in the authors' TF code).
        eps: cosine-norm epsilon.

    Shape:
        ``(B, C_in, H, W)`` -> ``(B, out_maps, H_out, W_out)``, ``H_out, W_out`` those of the layer.
    """

    def __init__(
        self,
        in_channels: int,
        out_maps: int,
        kernel_size: Tuple[int, int],
        stride: Tuple[int, int],
        padding: Tuple[int, int, int, int],
        dilation: Tuple[int, int],
        hidden: int = 16,
        kind: str = "sphere",
        core: Optional[PredictorCore] = None,
        zero_init_residual: bool = True,
        bn_eps: float = 1e-3,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        if core is None:
            core = PredictorCore(in_channels, hidden, out_maps, kind, eps)
            self.adapter: Optional[nn.Module] = None
        else:
            if core.out_maps != out_maps:
                raise ConfigError(f"shared predictor gives {core.out_maps} maps, this layer needs {out_maps}")
            self.adapter = nn.Conv2d(in_channels, core.in_channels, 1, bias=False)
        self.core = core
        self.bn = nn.BatchNorm2d(core.hidden, eps=bn_eps)
        self.gain = nn.Parameter(torch.zeros(out_maps)) if zero_init_residual else None
        self.stride = stride
        # conv1 is 3x3 / stride s on the input padded like the layer; the layer's receptive field
        # spans d*(k-1)+1, so pad (or crop, if negative) by (3 - span) in total to get its output size.
        span_h, span_w = dilation[0] * (kernel_size[0] - 1) + 1, dilation[1] * (kernel_size[1] - 1) + 1
        dh, dw = 3 - span_h, 3 - span_w
        self.pads = (padding[0] + dw // 2, padding[1] + dw - dw // 2, padding[2] + dh // 2, padding[3] + dh - dh // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.adapter is not None:
            x = self.adapter(x)
        h = torch.relu(self.bn(self.core.first(x, self.stride, self.pads)))
        return self.core.second(h, None if self.gain is None else torch.tanh(self.gain))
