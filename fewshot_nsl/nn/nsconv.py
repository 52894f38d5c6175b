"""NSConv2d: convolution with a learned (static) or predicted (dynamic) neural similarity.

``f_M(W, X) = W^T diag(M_s, ..., M_s) X`` (paper, Eq. 2): one ``kk x kk`` block ``M_s`` shared by
all kernels and all input channels of the layer. See :mod:`fewshot_nsl.nn.ns_conv_ops` for the
index conventions and the efficient dynamic application.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError
from .geometry import IntPair, Padding, _pair, conv_output_size, resolve_padding
from .ns_conv_ops import SIDES, ns_conv2d
from .sphere import PREDICTOR_KINDS, PredictorCore, SimilarityPredictor

__all__ = ["NSConv2d"]

STRUCTURES = ("dns", "uns")
MODES = ("static", "dynamic")
SHARINGS = ("disjoint", "shared")


def _choice(name: str, value: object, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


class NSConv2d(nn.Module):
    """2-D convolution with neural similarity ``out[o] = sum_c sum_{p,q} W[o,c,p] M_s[p,q] X[c,q] (+ bias)``.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        kernel_size: ``k`` or ``(kh, kw)``; ``kk = kh * kw``.
        stride: as :class:`torch.nn.Conv2d`.
        padding: int, pair, ``"same"`` or ``"valid"`` (zero padding).
        bias: add a learnable bias.
        dilation: as :class:`torch.nn.Conv2d` (``groups`` is always 1).
        structure: ``"dns"`` (diagonal ``M_s``, ``kk`` values) or ``"uns"`` (full ``M_s``, ``kk^2`` values).
        mode: ``"static"`` (``M_s`` is a parameter, initialised to ``I``) or ``"dynamic"``
            (``M_s(x) = I + predictor(x)`` at every output location).
        predictor: dynamic only: ``"sphere"`` (two 3x3 SphereConvs, the paper's text), ``"cnn"``
            (plain convs with a ``tanh``-bounded output) or ``"authors"`` (the NSL authors' code:
            input-normalised 3x3 conv, BN, ReLU, plain 3x3 conv, BN for DNS; no BN for UNS; see
            :mod:`fewshot_nsl.nn.sphere`).
        sharing: dynamic only: ``"disjoint"`` (own predictor) or ``"shared"`` (uses ``shared_predictor``
            through a per-layer 1x1 adapter). Defaults to ``"shared"`` iff ``shared_predictor`` is given.
        learn_shape: joint kernel-shape learning, ``M_s = D R`` with ``D = diag(1[D_r > alpha])`` (Sec. 3.5);
            ``D`` is static in both modes and ``D_r`` gets the straight-through gradient ``dL/dD``.
        shape_alpha: the threshold ``alpha``; ``D_r`` starts at 1.
        psd: static only: ``M_s = L L^T`` with ``L`` lower-triangular (init ``I``); DNS: ``m = l^2``.
        shared_predictor: a :class:`~fewshot_nsl.nn.sphere.PredictorCore` shared between layers
            (built by :func:`~fewshot_nsl.nn.make_conv_factory`).
        hidden: dynamic, disjoint: predictor width (the authors': 64 for DNS, 128 for UNS).
        zero_init_residual: dynamic: scale the predicted residual by ``tanh(gain)``, ``gain = 0`` at
            init, so the layer starts equal to the plain conv. ``None`` (default): on for
            ``"sphere"`` and ``"cnn"``, off for ``"authors"`` (their ``M_s = I + mask`` has no gate).
        predictor_bn_eps: BatchNorm epsilon inside the predictor.
        sphere_eps: epsilon of the cosine norms (``"sphere"``) or of the input patch norm (``"authors"``).
        side: dynamic application, ``"auto"``, ``"input"``, ``"output"`` or ``"taps"`` (see :func:`~fewshot_nsl.nn.ns_conv2d`).

    Attributes:
        weight: ``(C_out, C_in, kh, kw)``.
        bias: ``(C_out,)`` or ``None``.
        m_s: static, not psd: ``(kk,)`` (DNS diagonal) or ``(kk, kk)`` (UNS).
        m_chol: static, psd: ``(kk,)`` (DNS) or ``(kk, kk)`` (UNS; only its lower triangle is used).
        shape_r: learn_shape: ``D_r``, ``(kk,)``.
        predictor: dynamic: :class:`~fewshot_nsl.nn.sphere.SimilarityPredictor`.

    Shape:
        ``(B, C_in, H, W)`` -> ``(B, C_out, H_out, W_out)`` as :class:`torch.nn.Conv2d`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: Padding = 0,
        bias: bool = True,
        dilation: IntPair = 1,
        *,
        structure: str = "dns",
        mode: str = "static",
        predictor: str = "sphere",
        sharing: Optional[str] = None,
        learn_shape: bool = False,
        shape_alpha: float = 0.5,
        psd: bool = False,
        shared_predictor: Optional[PredictorCore] = None,
        hidden: int = 16,
        zero_init_residual: Optional[bool] = None,
        predictor_bn_eps: float = 1e-3,
        sphere_eps: float = 1e-4,
        side: str = "auto",
    ) -> None:
        super().__init__()
        _choice("structure", structure, STRUCTURES)
        _choice("mode", mode, MODES)
        _choice("predictor", predictor, PREDICTOR_KINDS)
        _choice("side", side, SIDES)
        sharing = sharing if sharing is not None else ("shared" if shared_predictor is not None else "disjoint")
        _choice("sharing", sharing, SHARINGS)
        if side == "taps" and (structure != "dns" or _pair(stride, "stride") != (1, 1)):
            raise ConfigError(f"side='taps' needs structure='dns' and stride 1 (got {structure!r}, stride {stride}); use side='auto'")
        if psd and mode != "static":
            raise ConfigError("psd=True is only available with mode='static' (the dynamic M_s is I + a predicted residual)")
        if mode == "static" and (sharing == "shared" or shared_predictor is not None):
            raise ConfigError("sharing='shared' / shared_predictor only apply to mode='dynamic'")
        if sharing == "shared" and shared_predictor is None:
            raise ConfigError("sharing='shared' needs shared_predictor=; build layers with make_conv_factory('dynamic', sharing='shared')")
        if sharing == "disjoint" and shared_predictor is not None:
            raise ConfigError("shared_predictor= given with sharing='disjoint'; drop one of them")

        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        self.padding = padding if isinstance(padding, str) else _pair(padding, "padding")
        self.pads = resolve_padding(padding, self.kernel_size, self.dilation, self.stride)
        self.structure, self.mode, self.psd, self.learn_shape = structure, mode, psd, learn_shape
        self.shape_alpha, self.side = shape_alpha, side
        self.predictor_kind: Optional[str] = predictor if mode == "dynamic" else None
        self.sharing: Optional[str] = sharing if mode == "dynamic" else None
        kk = self.kernel_size[0] * self.kernel_size[1]
        self.kk = kk

        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

        self.m_s: Optional[nn.Parameter] = None
        self.m_chol: Optional[nn.Parameter] = None
        self.predictor: Optional[SimilarityPredictor] = None
        if mode == "static":
            init = torch.ones(kk) if structure == "dns" else torch.eye(kk)
            if psd:
                self.m_chol = nn.Parameter(init)
            else:
                self.m_s = nn.Parameter(init)
        else:
            self.predictor = SimilarityPredictor(
                in_channels,
                kk if structure == "dns" else kk * kk,
                self.kernel_size,
                self.stride,
                self.pads,
                self.dilation,
                hidden=hidden,
                kind=predictor,
                core=shared_predictor,
                zero_init_residual=zero_init_residual,
                bn_eps=predictor_bn_eps,
                eps=sphere_eps,
                structure=structure,
            )
        self.shape_r = nn.Parameter(torch.ones(kk)) if learn_shape else None

    def reset_parameters(self) -> None:
        """Initialise ``weight`` and ``bias`` exactly as :class:`torch.nn.Conv2d` does."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    # ------------------------------------------------------------------ construction / export
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, structure: str = "dns", *, copy: bool = False, **kwargs: object) -> "NSConv2d":
        """Wrap a (pretrained) conv with ``M_s = I``: same output as ``conv``.

        Args:
            conv: a :class:`torch.nn.Conv2d` with ``groups=1`` and zero padding.
            structure: ``"dns"`` or ``"uns"``.
            copy: clone ``weight``/``bias``; by default the new layer holds the conv's own
                Parameter objects (training the wrapper then updates ``conv`` too).
            **kwargs: further :class:`NSConv2d` keyword arguments (``mode``, ``learn_shape``, ``psd``, ...).

        Returns:
            An :class:`NSConv2d` on the conv's device and dtype.
        """
        if conv.groups != 1:
            raise ConfigError(f"NSConv2d supports groups=1 only; this conv has groups={conv.groups}")
        if conv.padding_mode != "zeros":
            raise ConfigError(f"NSConv2d supports zero padding only; this conv has padding_mode={conv.padding_mode!r}")
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            conv.stride,  # type: ignore[arg-type]
            conv.padding,  # type: ignore[arg-type]
            conv.bias is not None,
            conv.dilation,  # type: ignore[arg-type]
            structure=structure,
            **kwargs,  # type: ignore[arg-type]
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        if copy:
            with torch.no_grad():
                layer.weight.copy_(conv.weight)
                if conv.bias is not None:
                    layer.bias.copy_(conv.bias)  # type: ignore[union-attr]
        else:
            layer.weight = conv.weight
            layer.bias = conv.bias
        return layer

    @torch.no_grad()
    def fold(self) -> nn.Conv2d:
        """A plain :class:`torch.nn.Conv2d` with weight ``M_s^T W`` (``W'[o,c,q] = sum_p W[o,c,p] M_s[p,q]``).

        Same output as this layer, same cost as the original CNN (static mode only).
        """
        if self.mode != "static":
            raise ConfigError("only a static NSConv2d can be folded; a dynamic M_s depends on the input")
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,  # type: ignore[arg-type]
            self.dilation,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        conv.weight.copy_(self.effective_weight())
        if self.bias is not None:
            conv.bias.copy_(self.bias)  # type: ignore[union-attr]
        return conv

    # ------------------------------------------------------------------ similarity
    def shape_mask(self) -> Optional[torch.Tensor]:
        """Kernel-shape mask ``diag(D)``, ``(kk,)`` of 0/1, straight-through to ``D_r``; ``None`` without learn_shape."""
        if self.shape_r is None:
            return None
        hard = (self.shape_r > self.shape_alpha).to(self.shape_r.dtype)
        return (hard - self.shape_r).detach() + self.shape_r

    def static_similarity(self) -> torch.Tensor:
        """Static ``M_s`` (including ``D``): ``(kk,)`` diagonal for DNS, ``(kk, kk)`` for UNS."""
        if self.mode != "static":
            raise ConfigError("static_similarity() needs mode='static'; use similarity(x) for a dynamic layer")
        if self.m_chol is not None:
            if self.structure == "dns":
                m = self.m_chol * self.m_chol
            else:
                low = torch.tril(self.m_chol)
                m = low @ low.transpose(0, 1)
        else:
            assert self.m_s is not None
            m = self.m_s
        d = self.shape_mask()
        if d is not None:
            m = d * m if m.dim() == 1 else d.unsqueeze(1) * m
        return m

    def _dynamic_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted ``M_s``, channel-first: DNS ``(B, kk, Ho, Wo)``, UNS ``(B, kk*kk, Ho, Wo)`` (row-major ``[p, q]``)."""
        assert self.predictor is not None
        r = self.predictor(x)
        kk = self.kk
        if self.structure == "dns":
            m = r + 1.0
        else:
            eye = torch.eye(kk, device=r.device, dtype=r.dtype).reshape(1, kk * kk, 1, 1)
            m = r + eye
        d = self.shape_mask()
        if d is not None:
            rows = d if self.structure == "dns" else d.repeat_interleave(kk)
            m = m * rows.view(1, -1, 1, 1)
        return m

    def similarity(self, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``M_s`` as used by the forward pass, in the layout of :func:`~fewshot_nsl.nn.ns_conv_reference`.

        Args:
            x: the layer's input ``(B, C_in, H, W)``; required in dynamic mode, ignored in static mode.

        Returns:
            static: ``(kk, kk)`` (DNS as a diagonal matrix); dynamic DNS: ``(B, L, kk)``;
            dynamic UNS: ``(B, L, kk, kk)``, ``L = H_out * W_out``.
        """
        if self.mode == "static":
            m = self.static_similarity()
            return torch.diag(m) if m.dim() == 1 else m
        if x is None:
            raise ConfigError("a dynamic NSConv2d needs the input x to predict its similarity")
        maps = self._dynamic_maps(x)
        b, _, ho, wo = maps.shape
        flat = maps.flatten(2).transpose(1, 2)  # (B, L, n)
        return flat if self.structure == "dns" else flat.reshape(b, ho * wo, self.kk, self.kk)

    def effective_weight(self) -> torch.Tensor:
        """Static: ``M_s^T W`` as a conv weight ``(C_out, C_in, kh, kw)``."""
        m = self.static_similarity()
        if m.dim() == 1:
            return self.weight * m.view(1, 1, *self.kernel_size)
        return torch.matmul(self.weight.flatten(2), m).view_as(self.weight)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, C_out, H_out, W_out)``."""
        if self.mode == "static":
            if isinstance(self.padding, str):
                x = nn.functional.pad(x, self.pads)
                return nn.functional.conv2d(x, self.effective_weight(), self.bias, self.stride, 0, self.dilation)
            return nn.functional.conv2d(x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation)
        m = self.similarity(x)
        return ns_conv2d(x, self.weight, self.bias, m, self.stride, self.padding, self.dilation, self.side)

    def output_size(self, size: Tuple[int, int]) -> Tuple[int, int]:
        """``(H_out, W_out)`` for an ``(H, W)`` input."""
        return conv_output_size(size, self.kernel_size, self.stride, self.pads, self.dilation)

    # ------------------------------------------------------------------ regularisers
    def _penalty_target(self, centered: bool) -> Optional[torch.Tensor]:
        if self.mode != "static":
            return None
        m = self.static_similarity()
        if centered:
            m = m - (torch.ones_like(m) if m.dim() == 1 else torch.eye(self.kk, dtype=m.dtype, device=m.device))
        return m

    def l1_penalty(self, centered: bool = False) -> torch.Tensor:
        """Sparsity penalty ``sum |M_s|`` (Sec. 3.4) of the static ``M_s`` as used (after ``L L^T`` and ``D``).

        Args:
            centered: penalise ``M_s - I`` instead (a prior towards the plain conv).

        Returns:
            A scalar; 0 for a dynamic layer, whose predictor is regularised like the backbone
            (weight decay), as in the authors' code.
        """
        m = self._penalty_target(centered)
        return self.weight.new_zeros(()) if m is None else m.abs().sum()

    def l2_penalty(self, centered: bool = False) -> torch.Tensor:
        """``0.5 * sum M_s^2`` (``tf.nn.l2_loss``, so the authors' static-UNS coefficient 5e-3 carries over).

        Args:
            centered: penalise ``M_s - I`` instead.

        Returns:
            A scalar; 0 for a dynamic layer.
        """
        m = self._penalty_target(centered)
        return self.weight.new_zeros(()) if m is None else 0.5 * m.pow(2).sum()

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
            f"structure={self.structure!r}, mode={self.mode!r}"
        )
        if self.mode == "dynamic":
            s += f", predictor={self.predictor_kind!r}, sharing={self.sharing!r}"
        if self.psd:
            s += ", psd=True"
        if self.learn_shape:
            s += f", learn_shape=True, shape_alpha={self.shape_alpha}"
        return s
