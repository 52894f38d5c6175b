"""CNN-4 and CNN-9 backbones, built from a conv factory so NSL convs swap in by configuration.

A conv factory is any callable
``conv_layer(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True) -> nn.Module``;
the default is :class:`torch.nn.Conv2d`. :func:`fewshot_nsl.nn.make_conv_factory` builds
static or dynamic neural-similarity factories.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .errors import ConfigError
from .registry import register_backbone

ConvFactory = Callable[..., nn.Module]


class Backbone(nn.Module):
    """Base class: ``forward_map`` gives feature maps, ``forward`` flattened features.

    Attributes:
        out_channels: channels of the last feature map.
    """

    out_channels: int

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, out_channels, h, w)``."""
        raise NotImplementedError

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


def _per_block(name: str, value, n: int) -> tuple:
    """A per-block setting given once (applies to every block) or as a list of ``n`` values."""
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(values) != n:
        raise ConfigError(f"backbone option {name} needs {n} values (one per block), got {list(values)}")
    return values


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
        chans = [3, filters, filters, filters, filters]
        pools, pads = _per_block("pool", pool, 4), _per_block("padding", padding, 4)
        self.blocks = nn.Sequential(
            *[conv_bn_relu(conv_layer, chans[i], chans[i + 1], bn_eps, pool=bool(pools[i]), padding=int(pads[i]))
              for i in range(4)]
        )  # fmt: skip
        self.out_channels = filters

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


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
        if len(widths) != 3:
            raise ConfigError(f"cnn9 widths needs 3 values (one per stage), got {list(widths)}")
        layers = [conv_bn_relu(conv_layer if nsl_stem else nn.Conv2d, 3, stem, bn_eps, pool=False)]
        cin = stem
        for w in widths:
            for j in range(3):
                layers.append(conv_bn_relu(conv_layer, cin, w, bn_eps, pool=(j == 2), ceil_pool=ceil_pool))
                cin = w
        self.blocks = nn.Sequential(*layers)
        self.global_pool = global_pool
        self.out_channels = cin

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
    return CNN9(stem=stem, widths=tuple(widths), conv_layer=conv_layer, bn_eps=bn_eps, global_pool=global_pool,
                nsl_stem=nsl_stem, ceil_pool=ceil_pool)
