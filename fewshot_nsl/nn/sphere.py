"""SphereConv2d and the dynamic neural-similarity predictors (paper, Sec. 3.3).

The predictor of one NSConv2d layer maps the layer's input ``x (B, C_in, H, W)`` to the residual
of ``M_s`` at every output location, ``(B, n_maps, H_out, W_out)`` with ``n_maps = kk`` (DNS) or
``kk * kk`` (UNS)::

    [adapter 1x1 conv ->] conv1 3x3 (layer stride) -> [BN] -> ReLU -> conv2 3x3 -> [BN | bound] -> [gain]

* ``kind="sphere"`` (the paper's text, Sec. 3.3.1 "Hyperspherical learning with identity
  residuals": ``M_theta(X) = SphereNet(X; theta) + I`` with hyperspherical convolutions, "each
  element of the output ... bounded between -1 and 1"; Sec. 7.1, Table 1): conv1 and conv2 are
  cosine convolutions, so the output already lies in ``(-1, 1)``; BN after conv1 only.
* ``kind="authors"`` (the NSL authors' public code, ``github:wy1iu/NSL``,
  ``nsl_image_recog/experiments_cifar10/dynamic_dns/architecture.py``, ``_combined_conv``, lines
  134-146, and ``dynamic_uns/architecture.py``, lines 132-146; the CIFAR-100 copies are identical):
  conv1 (their ``m1``) is a 3x3 convolution divided by the *input patch norm only*
  (``_conv_layer(..., norm=True)``, ``_get_input_norm``: ``sqrt(conv(x * x, ones) + 1e-4)``, lines
  68-73 and 87-89; the filter is not normalised), conv2 (``m2``) a plain 3x3 convolution, neither
  with a bias (``_conv_layer`` adds none). DNS: BN after both (``bn=True``), ReLU after the first,
  ``mask += 1`` (line 143). UNS: no BN at all (``bn=False``, ``dynamic_uns`` lines 137-140), ReLU
  after the first, ``mask += eye(9)``. Weights are drawn from
  ``N(0, (init_scale * sqrt(2 / (k * k * C_in)))^2)`` (``get_conv_filter``:
  ``tf.random_normal_initializer``, not truncated; line 84), ``init_scale`` 0.1 for conv1 and 0.001
  for conv2 (lines 138-141). The residual is not bounded: DNS starts small because the BN after the
  0.001-scaled conv2 divides a ~1e-3 signal by ``sqrt(var + 1e-3)``; UNS because conv2's output is
  ~1e-3 of its input. No gate by default (their ``M_s = I + mask``).
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
``C_in`` to the core's width), its own BatchNorms (statistics differ per layer) and its own gain.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError
from .geometry import IntPair, _pair
from .sphere_ops import input_normalized_conv2d, sphere_conv2d

__all__ = ["SphereConv2d", "HeNormalConv2d", "PredictorCore", "SimilarityPredictor"]

#: ``"sphere"``: the paper's SphereNet predictor; ``"cnn"``: plain convs + ``tanh``; ``"authors"``:
#: the NSL authors' public code (input-normalised conv, BN, ReLU, plain conv, BN).
PREDICTOR_KINDS = ("sphere", "cnn", "authors")
#: ``init_scale`` of the authors' ``m1`` and ``m2`` (``_combined_conv``: ``init_scale=0.1`` / ``0.001``).
AUTHORS_INIT_SCALES = (0.1, 0.001)


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


class HeNormalConv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` initialised as the NSL authors' TF ``get_conv_filter``: no bias,
    ``weight ~ N(0, (init_scale * sqrt(2 / fan_in))^2)``, ``fan_in = C_in * kh * kw`` (He normal,
    not truncated; ``tf.random_normal_initializer(stddev=sqrt(2 / (k*k*n_input)) * init_scale)``).

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        kernel_size: ``k`` or ``(kh, kw)``.
        padding: as :class:`torch.nn.Conv2d`.
        init_scale: factor on the He standard deviation.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: IntPair, padding: IntPair = 0, init_scale: float = 1.0
    ) -> None:
        self.init_scale = init_scale  # read by reset_parameters, which nn.Conv2d.__init__ calls
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=False)

    def reset_parameters(self) -> None:
        fan_in = self.weight[0].numel()
        nn.init.normal_(self.weight, 0.0, self.init_scale * math.sqrt(2.0 / fan_in))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", init_scale={self.init_scale}"


class PredictorCore(nn.Module):
    """The two 3x3 layers of a similarity predictor; shareable across NSConv2d layers.

    Args:
        in_channels: channels it reads (the layer's ``C_in``, or the common adapter width when shared).
        hidden: channels between the two layers.
        out_maps: ``kk`` (DNS) or ``kk * kk`` (UNS).
        kind: ``"sphere"`` (cosine convs), ``"cnn"`` (plain convs, final bias, ``tanh``) or
            ``"authors"`` (input-normalised conv, then a plain conv; no biases; He-normal init
            scaled by 0.1 and 0.001).
        eps: cosine-norm epsilon (sphere), input-norm epsilon (authors: 1e-4, theirs).
    """

    def __init__(self, in_channels: int, hidden: int, out_maps: int, kind: str = "sphere", eps: float = 1e-4) -> None:
        super().__init__()
        if kind not in PREDICTOR_KINDS:
            raise ConfigError(f"predictor must be one of {', '.join(PREDICTOR_KINDS)}, got {kind!r}")
        self.in_channels, self.hidden, self.out_maps, self.kind, self.eps = in_channels, hidden, out_maps, kind, eps
        if kind == "sphere":
            self.conv1: nn.Module = SphereConv2d(in_channels, hidden, 3, eps=eps)
            self.conv2: nn.Module = SphereConv2d(hidden, out_maps, 3, padding=1, eps=eps)
        elif kind == "authors":
            self.conv1 = HeNormalConv2d(in_channels, hidden, 3, init_scale=AUTHORS_INIT_SCALES[0])
            self.conv2 = HeNormalConv2d(hidden, out_maps, 3, padding=1, init_scale=AUTHORS_INIT_SCALES[1])
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
        if self.kind == "authors":
            return input_normalized_conv2d(x, self.conv1.weight, stride, pads, 1, self.eps)
        return nn.functional.conv2d(nn.functional.pad(x, pads), self.conv1.weight, None, stride)

    def second(self, h: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """conv2 (+ ``tanh`` for ``kind="cnn"``), times ``scale``.

        Args:
            h: ``(B, hidden, H_out, W_out)``.
            scale: optional ``(out_maps,)`` factor per map (a layer's ``tanh(gain)``); for
                ``kind="sphere"`` it is folded into the unit filters of the cosine conv.

        Returns:
            ``(B, out_maps, H_out, W_out)``; in ``(-1, 1)`` when ``|scale| < 1``, except for
            ``kind="authors"`` (a plain conv, unbounded).
        """
        if self.kind == "sphere":
            conv2 = self.conv2
            return sphere_conv2d(h, conv2.weight, conv2.stride, conv2.padding, conv2.dilation, self.eps, out_scale=scale)
        if self.kind == "authors":
            conv2 = self.conv2
            w = conv2.weight if scale is None else conv2.weight * scale.view(-1, 1, 1, 1)  # linear: fold the scale
            return nn.functional.conv2d(h, w, None, 1, conv2.padding)
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
        kind: ``"sphere"``, ``"cnn"`` or ``"authors"`` (ignored when ``core`` is given).
        core: a shared :class:`PredictorCore`; then a 1x1 adapter ``in_channels -> core.in_channels`` is added.
        zero_init_residual: multiply the residual by ``tanh(gain)``, ``gain`` initialised to 0 (starts at
            ``M_s = I``); ``None``: on for ``"sphere"`` and ``"cnn"`` (the suite's gate), off for
            ``"authors"`` (their code has none).
        bn_eps: BatchNorm epsilon (1e-3 as in the authors' TF code).
        eps: cosine-norm epsilon (sphere), input-norm epsilon (authors).
        structure: ``"dns"`` or ``"uns"``; decides the authors' BatchNorms (DNS: after conv1 and conv2; UNS: none).

    Attributes:
        bn: BatchNorm after conv1 (``None`` for the authors' UNS predictor).
        bn_out: BatchNorm after conv2 (the authors' DNS predictor only, else ``None``).
        gain: ``(out_maps,)`` gate parameter, or ``None``.

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
        zero_init_residual: Optional[bool] = None,
        bn_eps: float = 1e-3,
        eps: float = 1e-4,
        structure: str = "dns",
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
        authors = core.kind == "authors"
        # authors: `_conv_layer(..., bn=True)` for m1 and m2 in dynamic_dns, `bn=False` for both in dynamic_uns
        self.bn: Optional[nn.BatchNorm2d] = None if authors and structure == "uns" else nn.BatchNorm2d(core.hidden, eps=bn_eps)
        self.bn_out: Optional[nn.BatchNorm2d] = nn.BatchNorm2d(out_maps, eps=bn_eps) if authors and structure == "dns" else None
        if zero_init_residual is None:
            zero_init_residual = not authors
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
        h = self.core.first(x, self.stride, self.pads)
        if self.bn is not None:
            h = self.bn(h)
        h = torch.relu(h)
        scale = None if self.gain is None else torch.tanh(self.gain)
        if self.bn_out is None:
            return self.core.second(h, scale)
        r = self.bn_out(self.core.second(h))
        return r if scale is None else r * scale.view(1, -1, 1, 1)
