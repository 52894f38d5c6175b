"""Nearest-neighbour baseline (Ravi & Larochelle, ICLR 2017), as a plugin.

The backbone is pretrained with a linear head on all base classes; at test each query
takes the label of its nearest support feature (cosine similarity by default).
"""
from __future__ import annotations

import torch

from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method


@register_method("nearest_neighbor")
class NearestNeighbor(FewShotMethod):
    """1-NN on pretrained features; logit of a class = similarity to its closest support image."""

    training_stages = ("pretrain",)

    def __init__(self, backbone, image_size: int = 84, metric: str = "cosine") -> None:
        super().__init__(backbone, image_size)
        self.check_choice("metric", metric, ("cosine", "euclidean"))
        self.metric = metric
        self.support: torch.Tensor | None = None
        self.support_y: torch.Tensor | None = None

    def _similarity(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``(Q, D)``, ``(S, D)`` -> ``(Q, S)``; larger is closer."""
        if self.metric == "cosine":
            return self.cosine_similarities(q, s)
        return -self.squared_distances(q, s)

    def fit_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        self.support = self.backbone(support_x)
        self.support_y = support_y

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        sim = self._similarity(self.backbone(query_x), self.support)  # (Q, S)
        ways = self.num_ways(self.support_y)
        logits = sim.new_full((sim.shape[0], ways), float("-inf"))
        index = self.support_y.expand_as(sim)
        return logits.scatter_reduce(1, index, sim, reduce="amax")
