"""Conv factories for the backbones, and whole-model helpers for neural-similarity layers.

A conv factory is any callable
``conv_layer(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True) -> nn.Module``
(:mod:`fewshot_nsl.backbones`). Example::

    net = CNN4(conv_layer=make_conv_factory("dynamic", structure="dns"))
    net = wrap_convs_static(pretrained_cnn, structure="uns")      # every conv -> NSConv2d, M_s = I
    params = similarity_parameters(net)                            # only the M_s parameters
    loss = loss + similarity_regularization(net, l2=5e-3)
    deploy = fold_all(net)                                         # back to plain convs
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import ConfigError
from .functional import SIDES, IntPair, Padding, _pair
from .nsconv import MODES, NSConv2d, STRUCTURES, SHARINGS, _choice
from .sphere import PREDICTOR_KINDS, PredictorCore

__all__ = [
    "NSConvFactory",
    "make_conv_factory",
    "check_conv_spec",
    "wrap_convs_static",
    "fold_all",
    "similarity_parameters",
    "similarity_regularization",
    "FACTORY_OPTIONS",
]

#: Options accepted by :func:`make_conv_factory` for each kind.
FACTORY_OPTIONS: Dict[str, Tuple[str, ...]] = {
    "plain": (),
    "static": ("structure", "learn_shape", "shape_alpha", "psd"),
    "dynamic": (
        "structure",
        "predictor",
        "sharing",
        "hidden",
        "common_width",
        "learn_shape",
        "shape_alpha",
        "zero_init_residual",
        "predictor_bn_eps",
        "sphere_eps",
        "side",
    ),
}


#: How each option of :data:`FACTORY_OPTIONS` is checked: a tuple of allowed strings, or a kind of value.
_OPTION_CHECKS: Dict[str, Any] = {
    "structure": STRUCTURES, "predictor": PREDICTOR_KINDS, "sharing": SHARINGS, "side": SIDES,
    "hidden": "positive int", "common_width": "positive int",
    "learn_shape": "bool", "psd": "bool", "zero_init_residual": "bool or null",
    "shape_alpha": "finite number", "predictor_bn_eps": "positive number", "sphere_eps": "positive number",
}


def _check_option(name: str, value: Any, where: str) -> None:
    """One conv-spec option's value (see :data:`_OPTION_CHECKS`; an option without a rule is left to
    the layer); a bool is not a number."""
    rule = _OPTION_CHECKS.get(name)
    if rule is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(rule, tuple):
        ok, want = isinstance(value, str) and value in rule, f"one of {', '.join(rule)}"
    elif rule == "positive int":
        ok, want = number and isinstance(value, int) and value >= 1, "a positive integer"
    elif rule == "bool":
        ok, want = isinstance(value, bool), "true or false"
    elif rule == "bool or null":
        ok, want = value is None or isinstance(value, bool), "true, false or null"
    elif rule == "finite number":
        ok, want = number and math.isfinite(value), "a finite number"
    else:
        ok, want = number and math.isfinite(value) and value > 0, "a positive number"
    if not ok:
        raise ConfigError(f"{where}.{name} must be {want}, got {value!r}")


def check_conv_spec(spec: Any, partial: bool = False, where: str = "conv") -> None:
    """Refuse a conv spec (``{kind: ..., **options}``: a method's ``default_conv`` with the config's
    ``conv`` section over it) that :func:`make_conv_factory` could not build or whose layers would
    fail, without building anything, so that a bad spec is one line before any run folder exists.

    Args:
        spec: the spec; ``kind`` defaults to ``"plain"``.
        partial: ``spec`` is only the config's ``conv`` section (the method's default not merged in
            yet): a missing ``kind`` is not taken as ``plain``, and the options of any kind are accepted.
        where: name used in messages (``conv``).

    Raises:
        ConfigError: not a mapping, an unknown kind, an option unknown (to that kind), a value of
            the wrong type or out of range, or ``side: taps`` with ``structure: uns``.
    """
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where} must be a mapping such as {{kind: dynamic, structure: dns}}, got {spec!r}")
    kind = spec.get("kind", None if partial else "plain")
    if kind is not None and (not isinstance(kind, str) or kind not in FACTORY_OPTIONS):
        raise ConfigError(f"{where}.kind: unknown conv factory {kind!r}; accepted: {', '.join(FACTORY_OPTIONS)}")
    options = {k: v for k, v in spec.items() if k != "kind"}
    accepted = FACTORY_OPTIONS[kind] if kind is not None else tuple(dict.fromkeys(sum(FACTORY_OPTIONS.values(), ())))
    unknown = sorted(str(k) for k in set(options) - set(accepted))
    if unknown:
        which = f"for conv factory {kind!r}" if kind is not None else "in the conv spec"
        raise ConfigError(f"{where}: unknown option(s) {which}: {', '.join(unknown)}; "
                          f"accepted: {', '.join(accepted) if accepted else '(none)'}")
    for name, value in options.items():
        _check_option(name, value, where)
    if options.get("side") == "taps" and options.get("structure", "dns") != "dns":
        raise ConfigError(f"{where}: side 'taps' needs structure 'dns' (got {options['structure']!r}); use side 'auto'")


class NSConvFactory:
    """Builds :class:`NSConv2d` layers with fixed options; holds the shared predictors.

    Use one factory per model: with ``sharing="shared"`` every layer it builds with the same
    kernel size uses one :class:`PredictorCore` (held in :attr:`shared_predictors` and registered
    as a submodule of each such layer, so ``model.parameters()`` lists it once).

    Args:
        mode: ``"static"`` or ``"dynamic"``.
        structure: ``"dns"`` or ``"uns"``.
        predictor: ``"sphere"`` (the paper's SphereNet), ``"cnn"`` or ``"authors"`` (the NSL authors' code) (dynamic).
        sharing: ``"disjoint"`` or ``"shared"`` (dynamic).
        hidden: predictor width.
        common_width: shared: channels the per-layer 1x1 adapters map to.
        learn_shape: joint kernel-shape learning.
        shape_alpha: kernel-shape threshold.
        psd: static ``M_s = L L^T``.
        zero_init_residual: dynamic layers start as the plain conv (``tanh`` gate); ``None``: on except for ``"authors"``.
        predictor_bn_eps: BatchNorm epsilon in predictors.
        sphere_eps: cosine-norm epsilon.
        side: dynamic application side (``"auto"``, ``"input"``, ``"output"``, ``"taps"``).
    """

    def __init__(
        self,
        mode: str,
        structure: str = "dns",
        predictor: str = "sphere",
        sharing: str = "disjoint",
        hidden: int = 16,
        common_width: int = 16,
        learn_shape: bool = False,
        shape_alpha: float = 0.5,
        psd: bool = False,
        zero_init_residual: Optional[bool] = None,
        predictor_bn_eps: float = 1e-3,
        sphere_eps: float = 1e-4,
        side: str = "auto",
    ) -> None:
        _choice("mode", mode, MODES)
        _choice("structure", structure, STRUCTURES)
        _choice("predictor", predictor, PREDICTOR_KINDS)
        _choice("sharing", sharing, SHARINGS)
        if mode == "static" and sharing != "disjoint":
            raise ConfigError("sharing='shared' only applies to dynamic factories")
        self.mode, self.structure, self.predictor, self.sharing = mode, structure, predictor, sharing
        self.hidden, self.common_width = hidden, common_width
        self.learn_shape, self.shape_alpha, self.psd = learn_shape, shape_alpha, psd
        self.zero_init_residual, self.predictor_bn_eps, self.sphere_eps, self.side = (
            zero_init_residual,
            predictor_bn_eps,
            sphere_eps,
            side,
        )
        self.shared_predictors: Dict[Tuple[int, int], PredictorCore] = {}

    def shared_predictor(self, kernel_size: IntPair) -> PredictorCore:
        """The core shared by all layers with this kernel size (created on first use)."""
        key = _pair(kernel_size, "kernel_size")
        if key not in self.shared_predictors:
            kk = key[0] * key[1]
            self.shared_predictors[key] = PredictorCore(
                self.common_width, self.hidden, kk if self.structure == "dns" else kk * kk, self.predictor, self.sphere_eps
            )
        return self.shared_predictors[key]

    def __call__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: Padding = 0,
        bias: bool = True,
        dilation: IntPair = 1,
    ) -> NSConv2d:
        """Build one layer (the conv-factory contract of :mod:`fewshot_nsl.backbones`)."""
        if self.mode == "static":
            return NSConv2d(
                in_channels, out_channels, kernel_size, stride, padding, bias, dilation,
                structure=self.structure, mode="static", learn_shape=self.learn_shape,
                shape_alpha=self.shape_alpha, psd=self.psd,
            )  # fmt: skip
        shared = self.shared_predictor(kernel_size) if self.sharing == "shared" else None
        return NSConv2d(
            in_channels, out_channels, kernel_size, stride, padding, bias, dilation,
            structure=self.structure, mode="dynamic", predictor=self.predictor, sharing=self.sharing,
            learn_shape=self.learn_shape, shape_alpha=self.shape_alpha, shared_predictor=shared,
            hidden=self.hidden, zero_init_residual=self.zero_init_residual,
            predictor_bn_eps=self.predictor_bn_eps, sphere_eps=self.sphere_eps, side=self.side,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"NSConvFactory(mode={self.mode!r}, structure={self.structure!r}, sharing={self.sharing!r})"


def make_conv_factory(kind: str = "plain", **options: object) -> Callable[..., nn.Module]:
    """A conv factory for the backbones.

    Args:
        kind: ``"plain"`` (:class:`torch.nn.Conv2d`), ``"static"`` or ``"dynamic"`` (:class:`NSConvFactory`).
        **options: see :data:`FACTORY_OPTIONS` and :class:`NSConvFactory`.

    Returns:
        ``conv_layer(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True) -> nn.Module``.

    Raises:
        ConfigError: unknown kind or option (the message lists the accepted ones), or a bad value.
    """
    check_conv_spec({"kind": kind, **options}, where="conv factory")
    if kind == "plain":
        return nn.Conv2d
    return NSConvFactory(kind, **options)  # type: ignore[arg-type]


def wrap_convs_static(module: nn.Module, structure: str = "dns", **kwargs: object) -> nn.Module:
    """Replace every :class:`torch.nn.Conv2d` in ``module`` (in place) by ``NSConv2d.from_conv`` with ``M_s = I``.

    The wrapped layers hold the original weight/bias Parameters; outputs are unchanged until
    ``M_s`` is trained. Existing :class:`NSConv2d` layers (and the convs inside dynamic
    predictors) are left as they are, so wrapping twice is harmless.

    Args:
        module: any module (or a conv itself).
        structure: ``"dns"`` or ``"uns"``.
        **kwargs: further static :class:`NSConv2d` options (``learn_shape``, ``shape_alpha``, ``psd``).

    Returns:
        ``module`` (or the new layer when ``module`` is a conv).
    """
    if isinstance(module, nn.Conv2d):
        return NSConv2d.from_conv(module, structure, mode="static", **kwargs)
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            module.add_module(name, NSConv2d.from_conv(child, structure, mode="static", **kwargs))
        elif not isinstance(child, NSConv2d):  # leave NSConv2d layers (and their predictors' convs) alone
            wrap_convs_static(child, structure, **kwargs)
    return module


def fold_all(module: nn.Module) -> nn.Module:
    """Replace every static :class:`NSConv2d` in ``module`` (in place) by its folded :class:`torch.nn.Conv2d`.

    Returns:
        ``module`` (or the folded conv when ``module`` is a static NSConv2d).
    """
    if isinstance(module, NSConv2d) and module.mode == "static":
        return module.fold()
    for name, child in module.named_children():
        if isinstance(child, NSConv2d) and child.mode == "static":
            module.add_module(name, child.fold())
        else:
            fold_all(child)
    return module


def similarity_parameters(module: nn.Module) -> List[nn.Parameter]:
    """The ``M_s`` parameters (``m_s``, ``m_chol``, ``shape_r``) of every static :class:`NSConv2d`, each once."""
    params: List[nn.Parameter] = []
    seen = set()
    for layer in module.modules():
        if isinstance(layer, NSConv2d) and layer.mode == "static":
            for p in (layer.m_s, layer.m_chol, layer.shape_r):
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


def similarity_regularization(
    model: nn.Module, l1: float = 0.0, l2: float = 0.0, centered: bool = False
) -> torch.Tensor:
    """``l1 * sum |M_s| + l2 * 0.5 * sum M_s^2`` over every static :class:`NSConv2d` in ``model``.

    Args:
        model: any module.
        l1: sparsity coefficient (paper, Sec. 3.4).
        l2: L2 coefficient (authors' static UNS: 5e-3).
        centered: penalise ``M_s - I`` instead of ``M_s``.

    Returns:
        A scalar tensor (0 when there is nothing to regularise).
    """
    total: Union[torch.Tensor, None] = None
    for layer in model.modules():
        if isinstance(layer, NSConv2d):
            term = layer.weight.new_zeros(())
            if l1:
                term = term + l1 * layer.l1_penalty(centered)
            if l2:
                term = term + l2 * layer.l2_penalty(centered)
            total = term if total is None else total + term
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None, dtype=p.dtype if p is not None else None)
    return total
