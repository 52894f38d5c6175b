"""A BatchNorm-free backbone (``nobn4``) for the data-parallel equivalence test.

Without batch-dependent layers, a data-parallel step over slices of a batch equals the
single-process step over the whole batch (see ``fewshot_nsl.distributed``). Loaded only by
``tests/test_ddp.py`` (``--plugins tests/ddp_plugins``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fewshot_nsl.backbones import Backbone
from fewshot_nsl.registry import register_backbone


class NoBN4(Backbone):
    """Two conv3x3-ReLU-maxpool blocks: ``(B, 3, H, W)`` -> ``(B, filters, H/4, W/4)``."""

    def __init__(self, filters: int = 8, conv_layer: Optional[nn.Module] = None) -> None:
        super().__init__()
        conv = conv_layer or nn.Conv2d
        self.net = nn.Sequential(
            conv(3, filters, 3, stride=1, padding=1, bias=True), nn.ReLU(), nn.MaxPool2d(2),
            conv(filters, filters, 3, stride=1, padding=1, bias=True), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.out_channels = filters

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_backbone("nobn4")
def nobn4(filters: int = 8, conv_layer=None) -> NoBN4:
    """BN-free 2-block CNN (tests)."""
    return NoBN4(filters, conv_layer)
