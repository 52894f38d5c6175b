"""CNN-4 and CNN-9 backbones, built from a conv factory so NSL convs swap in by configuration.

A conv factory is any callable
``conv_layer(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True) -> nn.Module``;
the default is :class:`torch.nn.Conv2d`. :func:`fewshot_nsl.nn.make_conv_factory` builds
static or dynamic neural-similarity factories.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

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

    @torch.no_grad()
    def feature_dim(self, image_size: int) -> int:
        """Length ``D`` of the flattened feature for square ``image_size`` inputs."""
        was_training = self.training
        self.eval()
        p = next(self.parameters())
        d = self.forward(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)).shape[1]
        self.train(was_training)
        return int(d)


def conv_bn_relu(
    conv_layer: ConvFactory, cin: int, cout: int, bn_eps: float, pool: bool
) -> nn.Sequential:
    """3x3 conv (padding 1) -> BatchNorm -> ReLU [-> 2x2 max-pool]."""
    layers = [conv_layer(cin, cout, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(cout, eps=bn_eps), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class CNN4(Backbone):
    """Four conv-BN-ReLU-maxpool blocks (Ravi & Larochelle; Vinyals et al.).

    ``(B, 3, 84, 84)`` -> map ``(B, filters, 5, 5)`` -> feature ``(B, 25 * filters)``.

    Args:
        filters: filters per layer; 32 as in the NSL paper (following Ravi & Larochelle), 64 as in many peers.
        conv_layer: conv factory (plain ``nn.Conv2d`` by default).
        bn_eps: BatchNorm epsilon (the authors' TF code uses 1e-3).
    """

    def __init__(self, filters: int = 32, conv_layer: Optional[ConvFactory] = None, bn_eps: float = 1e-5) -> None:
        super().__init__()
        conv_layer = conv_layer or nn.Conv2d
        chans = [3, filters, filters, filters, filters]
        self.blocks = nn.Sequential(
            *[conv_bn_relu(conv_layer, chans[i], chans[i + 1], bn_eps, pool=True) for i in range(4)]
        )
        self.out_channels = filters

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class CNN9(Backbone):
    """A 3x3 stem conv, then three stages of three 3x3 conv-BN-ReLU layers, each stage ending in 2x2 max-pool.

    Follows the layout of the NSL authors' public code. ``(B, 3, 84, 84)`` -> map
    ``(B, widths[-1], 10, 10)``; with ``global_pool=True`` the feature is ``(B, widths[-1])``.

    Args:
        stem: stem width.
        widths: width of each of the three stages.
        conv_layer: conv factory.
        bn_eps: BatchNorm epsilon.
        global_pool: average-pool the last map to 1x1 (keeps classifier heads small).
    """

    def __init__(
        self,
        stem: int = 64,
        widths: Sequence[int] = (64, 128, 256),
        conv_layer: Optional[ConvFactory] = None,
        bn_eps: float = 1e-5,
        global_pool: bool = False,
    ) -> None:
        super().__init__()
        conv_layer = conv_layer or nn.Conv2d
        layers = [conv_bn_relu(conv_layer, 3, stem, bn_eps, pool=False)]
        cin = stem
        for w in widths:
            for j in range(3):
                layers.append(conv_bn_relu(conv_layer, cin, w, bn_eps, pool=(j == 2)))
                cin = w
        self.blocks = nn.Sequential(*layers)
        self.global_pool = global_pool
        self.out_channels = cin

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        return x.mean(dim=(2, 3), keepdim=True) if self.global_pool else x


@register_backbone("cnn4")
def cnn4(filters: int = 32, conv_layer: Optional[ConvFactory] = None, bn_eps: float = 1e-5) -> CNN4:
    """CNN-4 backbone (see :class:`CNN4`)."""
    return CNN4(filters=filters, conv_layer=conv_layer, bn_eps=bn_eps)


@register_backbone("cnn9")
def cnn9(
    stem: int = 64,
    widths: Sequence[int] = (64, 128, 256),
    conv_layer: Optional[ConvFactory] = None,
    bn_eps: float = 1e-5,
    global_pool: bool = True,
) -> CNN9:
    """CNN-9 backbone (see :class:`CNN9`); global average pooling on by default."""
    return CNN9(stem=stem, widths=tuple(widths), conv_layer=conv_layer, bn_eps=bn_eps, global_pool=global_pool)
