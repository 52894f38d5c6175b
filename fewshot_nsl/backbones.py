"""CNN-4 and CNN-9 backbones, built from a conv factory so NSL convs swap in by configuration.

A conv factory is any callable
``conv_layer(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True) -> nn.Module``;
the default is :class:`torch.nn.Conv2d`. :func:`fewshot_nsl.nn.make_conv_factory` builds
static or dynamic neural-similarity factories.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .errors import ConfigError, FewShotError, one_line
from .registry import register_backbone

ConvFactory = Callable[..., nn.Module]
#: Largest input side :func:`min_input_size` searches (above :data:`fewshot_nsl.config.MAX_IMAGE_SIZE`).
_MAX_SIDE = 4096
#: Most parameters a backbone may have (4 GB in fp32; CNN-9 has 0.3 M): more is a typo in its widths.
MAX_BACKBONE_PARAMS = 10**9


class Backbone(nn.Module):
    """Base class: ``forward_map`` gives feature maps, ``forward`` flattened features.

    Attributes:
        out_channels: channels of the last feature map.
    """

    out_channels: int
    #: ``backbone_options`` that make the feature map shrink less (named in the too-small message).
    shrink_options: Tuple[str, ...] = ()

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, out_channels, h, w)``."""
        raise NotImplementedError

    def min_image_size(self) -> Optional[int]:
        """Smallest square input side every layer accepts (each map at least 1x1), or ``None`` when
        the layers do not say (then :func:`check_image_size` tries a forward pass instead).
        Backbones whose layers run in registration order return :func:`min_input_size` of them."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, D)`` with ``D = feature_dim(H)``."""
        return self.forward_map(x).flatten(1)

    def feature_dim(self, image_size: int) -> int:
        """Length ``D`` of the flattened feature for square ``image_size`` inputs."""
        return int(dry_run(self, self.forward, image_size).shape[1])


@torch.no_grad()
def dry_run(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], image_size: int) -> torch.Tensor:
    """``fn`` of one black ``(1, 3, image_size, image_size)`` image on ``module``'s device and dtype, with
    ``module`` in eval mode (its mode restored after): output shapes of a backbone without changing it.

    Args:
        module: the module whose mode is switched (and whose first parameter gives device and dtype).
        fn: e.g. ``module.forward`` or ``module.forward_map``.
        image_size: side of the square input.
    """
    was_training = module.training
    module.eval()
    p = next(module.parameters())
    out = fn(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype))
    module.train(was_training)
    return out


# ----------------------------------------------------------------------------- input sizes
def _side(value: Any) -> int:
    """The height part of an int-or-pair layer setting."""
    return int(value[0] if isinstance(value, (tuple, list)) else value)


def _conv_out(n: int, layer: nn.Module) -> int:
    """Output side of a conv (``nn.Conv2d`` or :class:`~fewshot_nsl.nn.NSConv2d`) on an ``n``-pixel input."""
    k, s, d = _side(layer.kernel_size), _side(layer.stride), _side(layer.dilation)
    pads = getattr(layer, "pads", None)  # NSConv2d: resolved (left, right, top, bottom)
    if pads is not None:
        total = int(pads[2]) + int(pads[3])
    elif isinstance(layer.padding, str):
        return n if layer.padding == "same" else (n - d * (k - 1) - 1) // s + 1
    else:
        total = 2 * _side(layer.padding)
    return (n + total - d * (k - 1) - 1) // s + 1


def _pool_out(n: int, layer: nn.Module) -> int:
    """Output side of a max/avg pool on an ``n``-pixel input (PyTorch's ``pooling_output_shape``)."""
    k, p = _side(layer.kernel_size), _side(layer.padding)
    s = _side(layer.stride if layer.stride is not None else layer.kernel_size)
    d = _side(getattr(layer, "dilation", 1))
    ceil = bool(layer.ceil_mode)
    out = (n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= n + p:
        out -= 1
    return out


def _spatial_layers(module: nn.Module) -> Iterator[nn.Module]:
    """Convs and pools of ``module`` in registration order; a conv's own submodules (a dynamic
    layer's predictor) run beside it, not after it, and are not entered."""
    for child in module.children():
        if isinstance(child, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) \
                or hasattr(child, "kernel_size") and hasattr(child, "dilation"):
            yield child
        else:
            yield from _spatial_layers(child)


def _output_side(layers: List[nn.Module], n: int) -> int:
    """Side of the last map for an ``n``-pixel input, or 0 as soon as some layer has nothing left."""
    for layer in layers:
        if isinstance(layer, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            size = layer.output_size
            n = n if size is None or _side(size) is None else _side(size)
        elif isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
            n = _pool_out(n, layer)
        else:
            n = _conv_out(n, layer)
        if n < 1:
            return 0
    return n


def min_input_size(module: nn.Module) -> int:
    """Smallest square input side for which every conv and pool of ``module`` (run in registration
    order, as in an ``nn.Sequential``) leaves a map of at least 1x1.

    Example: CNN-4 (four padded 3x3 convs, each followed by a 2x2 max-pool) needs 16 px
    (16 -> 8 -> 4 -> 2 -> 1); with unpadded convs it needs 46 px; Sung et al.'s RelationNet encoder
    (``padding: [0, 0, 1, 1]``, ``pool: [true, true, false, false]``) needs 10 px.

    Raises:
        ConfigError: no input up to 4096 px is large enough.
    """
    layers = list(_spatial_layers(module))
    low, high = 1, _MAX_SIDE  # the output side never decreases as the input grows: bisect
    if _output_side(layers, high) < 1:
        raise ConfigError(f"{type(module).__name__}: no input up to {_MAX_SIDE} px survives its convs and pools; "
                          f"check its options")
    while low < high:
        mid = (low + high) // 2
        if _output_side(layers, mid) >= 1:
            high = mid
        else:
            low = mid + 1
    return low


def check_image_size(name: str, options: Dict[str, Any], image_size: int) -> None:
    """Refuse, in one line, an ``image_size`` too small for backbone ``name`` built with ``options``,
    options the backbone cannot be built with, and more than :data:`MAX_BACKBONE_PARAMS` parameters,
    before anything is trained.

    The backbone is built with plain convs (a conv factory keeps every layer's kernel, stride and
    padding) on the ``meta`` device, so nothing is allocated. Its minimum comes from its layers
    (:meth:`Backbone.min_image_size`); a backbone that does not give one is run forward on one
    meta image of ``image_size`` instead.

    Raises:
        ConfigError: naming the backbone, its minimum and the fix; or why it cannot be built.
    """
    from .registry import BACKBONES, create_backbone

    def cannot(exc: BaseException) -> ConfigError:
        return ConfigError(f"backbone {name} cannot be built with backbone_options {options} ({one_line(exc)}); "
                           f"fix backbone_options")

    try:
        with torch.device("meta"):
            net = create_backbone(name, **options)
    except FewShotError:
        raise
    except Exception as exc:  # noqa: BLE001
        if getattr(BACKBONES.get(name), "__module__", None) == __name__:
            raise cannot(exc) from None  # a built-in builds on meta unless its sizes overflow
        try:  # a plugin backbone that cannot be built on meta (it loads weights, say): build it for real
            net = create_backbone(name, **options)
        except FewShotError:
            raise
        except Exception as exc2:  # noqa: BLE001
            raise cannot(exc2) from None
    n_params = sum(p.numel() for p in net.parameters())
    if n_params > MAX_BACKBONE_PARAMS:
        raise ConfigError(f"backbone {name} with backbone_options {options} has {n_params:,} parameters, more than "
                          f"{MAX_BACKBONE_PARAMS:,} ({4 * n_params / 2**30:,.0f} GiB in fp32); lower its widths")
    minimum = net.min_image_size() if isinstance(net, Backbone) else None
    if minimum is not None:
        if image_size < minimum:
            shrink = getattr(net, "shrink_options", ())
            other = f", or backbone_options ({', '.join(shrink)}) that shrink the map less" if shrink else ""
            raise ConfigError(f"image_size {image_size} is too small: backbone {name} needs images of at least "
                              f"{minimum} px (its convs and pools shrink smaller ones to nothing); use "
                              f"--image-size {minimum} or more{other}")
        return
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            net.eval()
            fn = net.forward_map if isinstance(net, Backbone) else net
            fn(torch.zeros(2, 3, image_size, image_size, device=device))
    except FewShotError:
        raise
    except RuntimeError as exc:
        raise ConfigError(f"image_size {image_size} is too small for backbone {name} ({one_line(exc)}); "
                          f"raise --image-size") from None


# ----------------------------------------------------------------------------- option checks
def _positive_int(backbone: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"backbone {backbone} option {name} must be a positive integer, got {value!r}")
    return value


def _non_negative_int(backbone: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"backbone {backbone} option {name} must be a non-negative integer, got {value!r}")
    return value


def _flag(backbone: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"backbone {backbone} option {name} must be true or false, got {value!r}")
    return value


def _positive_number(backbone: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"backbone {backbone} option {name} must be a positive number, got {value!r}")
    return float(value)


def conv_bn_relu(
    conv_layer: ConvFactory, cin: int, cout: int, bn_eps: float, pool: bool, padding: int = 1, ceil_pool: bool = False
) -> nn.Sequential:
    """3x3 conv -> BatchNorm -> ReLU [-> 2x2 max-pool]; ``ceil_pool`` keeps the last odd row/column (TF 'SAME')."""
    layers = [
        conv_layer(cin, cout, 3, stride=1, padding=padding, bias=False),
        nn.BatchNorm2d(cout, eps=bn_eps),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2, ceil_mode=ceil_pool))
    return nn.Sequential(*layers)


def _per_block(name: str, value, n: int, check: Optional[Callable[[str, str, Any], Any]] = None,
               backbone: str = "cnn4") -> tuple:
    """A per-block setting given once (applies to every block) or as a list of ``n`` values, each
    passed through ``check(backbone, name, value)``."""
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(values) != n:
        raise ConfigError(f"backbone {backbone} option {name} needs {n} values (one per block), got {list(values)}")
    return tuple(check(backbone, name, v) for v in values) if check else values


class CNN4(Backbone):
    """Four conv-BN-ReLU(-maxpool) blocks (Ravi & Larochelle; Vinyals et al.; Snell et al.; Sung et al.).

    Default: every block pools, padding 1: ``(B, 3, 84, 84)`` -> map ``(B, filters, 5, 5)`` ->
    feature ``(B, 25 * filters)``. Sung et al.'s RelationNet encoder is ``filters=64,
    pool=[true, true, false, false], padding=[0, 0, 1, 1]``: map ``(B, 64, 19, 19)`` at 84 px.

    Args:
        filters: filters per layer; 32 as in the NSL paper (following Ravi & Larochelle), 64 as in many peers.
        conv_layer: conv factory (plain ``nn.Conv2d`` by default).
        bn_eps: BatchNorm epsilon (the authors' TF code uses 1e-3).
        pool: whether each block ends in a 2x2 max-pool (one value for all blocks, or four).
        padding: zero padding of each block's 3x3 conv (one value, or four).
    """

    shrink_options = ("padding", "pool")

    def __init__(
        self,
        filters: int = 32,
        conv_layer: Optional[ConvFactory] = None,
        bn_eps: float = 1e-5,
        pool: Union[bool, Sequence[bool]] = True,
        padding: Union[int, Sequence[int]] = 1,
    ) -> None:
        super().__init__()
        conv_layer = conv_layer or nn.Conv2d
        filters = _positive_int("cnn4", "filters", filters)
        bn_eps = _positive_number("cnn4", "bn_eps", bn_eps)
        chans = [3, filters, filters, filters, filters]
        pools = _per_block("pool", pool, 4, _flag)
        pads = _per_block("padding", padding, 4, _non_negative_int)
        self.blocks = nn.Sequential(
            *[conv_bn_relu(conv_layer, chans[i], chans[i + 1], bn_eps, pool=pools[i], padding=pads[i])
              for i in range(4)]
        )  # fmt: skip
        self.out_channels = filters

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def min_image_size(self) -> int:
        """16 px by default (four 2x2 pools), 46 unpadded, 10 for Sung et al.'s encoder."""
        return min_input_size(self.blocks)


class CNN9(Backbone):
    """The NSL authors' 9-layer CNN: a 3x3 root conv, then three stages of three 3x3 conv-BN-ReLU
    layers, each stage ending in 2x2 max-pool; the classifier ('score' conv over the last map in
    the authors' code, i.e. a fully connected layer) is the head the harness puts on the flattened map.

    Defaults follow the authors' public CIFAR code (``nsl_image_recog/experiments_cifar10/dynamic_dns/
    architecture.py``, ``VGG.build``): plain root conv of 32 (BN, ReLU; not a neural-similarity conv),
    stage widths 32 / 64 / 128, 'SAME' max-pool (``ceil_pool``), BN eps 1e-3. ``(B, 3, 84, 84)`` ->
    map ``(B, 128, 11, 11)`` -> feature ``(B, 15488)``; at 42 px ``(B, 128, 6, 6)`` -> ``(B, 4608)``.

    Args:
        stem: root conv width.
        widths: width of each of the three stages.
        conv_layer: conv factory for the nine stage convs (and the stem with ``nsl_stem``).
        bn_eps: BatchNorm epsilon.
        global_pool: average-pool the last map to 1x1 (feature ``(B, widths[-1])``; not the authors' layout).
        nsl_stem: build the root conv with ``conv_layer`` too (the authors' root conv is plain).
        ceil_pool: max-pool keeps the last odd row/column, as TF's 'SAME' pooling in the authors' code.
    """

    shrink_options = ("ceil_pool",)

    def __init__(
        self,
        stem: int = 32,
        widths: Sequence[int] = (32, 64, 128),
        conv_layer: Optional[ConvFactory] = None,
        bn_eps: float = 1e-3,
        global_pool: bool = False,
        nsl_stem: bool = False,
        ceil_pool: bool = True,
    ) -> None:
        super().__init__()
        conv_layer = conv_layer or nn.Conv2d
        if not isinstance(widths, (list, tuple)) or len(widths) != 3:
            raise ConfigError(f"backbone cnn9 option widths needs a list of 3 values (one per stage), got {widths!r}")
        widths = [_positive_int("cnn9", "widths", w) for w in widths]
        stem = _positive_int("cnn9", "stem", stem)
        bn_eps = _positive_number("cnn9", "bn_eps", bn_eps)
        global_pool, nsl_stem = _flag("cnn9", "global_pool", global_pool), _flag("cnn9", "nsl_stem", nsl_stem)
        ceil_pool = _flag("cnn9", "ceil_pool", ceil_pool)
        layers = [conv_bn_relu(conv_layer if nsl_stem else nn.Conv2d, 3, stem, bn_eps, pool=False)]
        cin = stem
        for w in widths:
            for j in range(3):
                layers.append(conv_bn_relu(conv_layer, cin, w, bn_eps, pool=(j == 2), ceil_pool=ceil_pool))
                cin = w
        self.blocks = nn.Sequential(*layers)
        self.global_pool = global_pool
        self.out_channels = cin

    def min_image_size(self) -> int:
        """1 px with 'SAME' (ceil) pooling (a 1-pixel map pools to 1 pixel), 8 px with floor pooling."""
        return min_input_size(self.blocks)

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        return x.mean(dim=(2, 3), keepdim=True) if self.global_pool else x


@register_backbone("cnn4")
def cnn4(
    filters: int = 32,
    conv_layer: Optional[ConvFactory] = None,
    bn_eps: float = 1e-5,
    pool: Union[bool, Sequence[bool]] = True,
    padding: Union[int, Sequence[int]] = 1,
) -> CNN4:
    """CNN-4 backbone (see :class:`CNN4`)."""
    return CNN4(filters=filters, conv_layer=conv_layer, bn_eps=bn_eps, pool=pool, padding=padding)


@register_backbone("cnn9")
def cnn9(
    stem: int = 32,
    widths: Sequence[int] = (32, 64, 128),
    conv_layer: Optional[ConvFactory] = None,
    bn_eps: float = 1e-3,
    global_pool: bool = False,
    nsl_stem: bool = False,
    ceil_pool: bool = True,
) -> CNN9:
    """CNN-9 backbone (see :class:`CNN9`): the authors' layout by default."""
    return CNN9(stem=stem, widths=widths, conv_layer=conv_layer, bn_eps=bn_eps, global_pool=global_pool,
                nsl_stem=nsl_stem, ceil_pool=ceil_pool)
