"""Relation Networks (Sung et al., CVPR 2018), as a plugin.

The backbone's feature maps of a query and of a class (K-shot: the sum of the class's
support maps, as in the paper) are concatenated along channels and scored by a relation
module: two conv blocks (3x3 conv, BN, ReLU, 2x2 max-pool) and two fully connected layers
(hidden width 8, ReLU, sigmoid output). Training regresses the scores onto one-hot targets
with mean squared error.

Unlike Sung et al.'s embedding (whose last two blocks do not pool), the suite's CNN-4 gives
5x5 maps at 84x84 and 1x1 maps at small sizes, so the relation convs are padded and a pool is
skipped where the map is already 1 pixel wide (ceil mode otherwise).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method


def sung_init(m: nn.Module) -> None:
    """Sung et al.'s initialisation (their ``weights_init``): He-normal convs (fan-out), unit BN, and
    fully connected layers with N(0, 0.01) weights and biases of 1, which keeps the 8 hidden ReLUs
    alive at the start (with PyTorch's default init the scores tend to collapse to a constant 1/ways)."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0.0, 0.01)
        nn.init.ones_(m.bias)


class RelationBlock(nn.Module):
    """3x3 conv (padding 1) -> BN -> ReLU -> 2x2 max-pool (ceil mode; skipped on 1-pixel maps)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, cin, h, w)`` -> ``(B, cout, ceil(h/2), ceil(w/2))`` (unchanged sides of 1 stay 1)."""
        x = F.relu(self.bn(self.conv(x)))
        if min(x.shape[-2:]) >= 2:
            x = F.max_pool2d(x, 2, ceil_mode=True)
        return x


@register_method("relationnet")
class RelationNet(FewShotMethod):
    """RelationNet: a learned relation module scores (query, class) feature-map pairs in [0, 1].

    Args:
        backbone: embedding network (``forward_map`` -> ``(B, C, h, w)``).
        image_size: input side, to size the fully connected layers.
        relation_channels: width of the relation convs (default: the backbone's ``C``, as Sung et al.).
        hidden: width of the first fully connected layer (8 in the paper).
        pretrained_backbone: start the embedding from the suite's cached base-class pretraining
            (the same one the finetune and NSN methods use) instead of from scratch, then train
            episodically as usual. Sung et al. train from scratch (``False``, the default).
    """

    training_stages = ("episodic",)

    def __init__(
        self,
        backbone,
        image_size: int = 84,
        relation_channels: Optional[int] = None,
        hidden: int = 8,
        pretrained_backbone: bool = False,
    ) -> None:
        super().__init__(backbone, image_size)
        c = backbone.out_channels
        width = relation_channels or c
        self.blocks = nn.Sequential(RelationBlock(2 * c, width), RelationBlock(width, width))
        side = self._map_side(backbone, image_size)
        side = (side + 3) // 4  # two blocks, each ceil(side / 2) (a side of 1 stays 1)
        self.fc = nn.Sequential(nn.Linear(width * side * side, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))
        self.blocks.apply(sung_init)
        self.fc.apply(sung_init)
        self.prototypes: Optional[torch.Tensor] = None  # (ways, C, h, w) summed support maps

    @staticmethod
    @torch.no_grad()
    def _map_side(backbone, image_size: int) -> int:
        """Side ``h`` of the backbone's (square) feature map for ``image_size`` inputs."""
        p = next(backbone.parameters())
        was_training = backbone.training
        backbone.eval()
        h = backbone.forward_map(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)).shape[-1]
        backbone.train(was_training)
        return int(h)

    def fit_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        maps = self.backbone.forward_map(support_x)  # (S, C, h, w)
        ways = self.num_ways(support_y)
        self.prototypes = maps.new_zeros(ways, *maps.shape[1:]).index_add_(0, support_y, maps)

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        """``(Q, 3, H, W)`` -> relation scores ``(Q, ways)`` in ``[0, 1]``."""
        q = self.backbone.forward_map(query_x)  # (Q, C, h, w)
        n_q, ways = q.shape[0], self.prototypes.shape[0]
        pairs = torch.cat(
            [q.unsqueeze(1).expand(-1, ways, -1, -1, -1), self.prototypes.unsqueeze(0).expand(n_q, -1, -1, -1, -1)],
            dim=2,
        ).flatten(0, 1)  # (Q * ways, 2C, h, w)
        scores = torch.sigmoid(self.fc(self.blocks(pairs).flatten(1)))
        return scores.view(n_q, ways)

    def loss(self, support_x, support_y, query_x, query_y) -> torch.Tensor:
        """Mean squared error between relation scores and one-hot query labels."""
        self.fit_support(support_x, support_y)
        scores = self(query_x)
        return F.mse_loss(scores, F.one_hot(query_y, scores.shape[1]).to(scores.dtype))
