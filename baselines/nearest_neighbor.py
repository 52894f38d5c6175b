"""Nearest-neighbour baseline (Ravi & Larochelle, ICLR 2017), as a plugin.

The backbone is pretrained with a linear head on all base classes; at test each query
takes the label of its nearest support feature (cosine similarity by default).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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

    # ------------------------------------------------------------------ batched evaluation
    def supports_batched_evaluation(self) -> bool:
        """Always: nothing is trained per episode."""
        return True

    def episode_bytes(self, support: int, queries: int, image_size: int) -> int:
        """The episode's images, features and similarities (float32); the backbone runs in fixed chunks."""
        return 4 * ((support + queries) * (3 * image_size**2 + 2 * self.backbone.feature_dim(image_size))
                    + 2 * queries * support)

    def image_embedding(self):
        """The backbone (frozen at test): each image is embedded once per evaluation."""
        return self.backbone

    def evaluate_embedded(self, support_f, support_y, query_f, seeds, ways) -> torch.Tensor:
        """``E`` episodes at once from their images' features: every episode's ``(Q, S)`` similarities, then the
        best per class. ``(E, S, D)``, ``(E, S)``, ``(E, Q, D)`` -> ``(E, Q, ways)``. Nothing is drawn from the
        RNG (``seeds`` unused)."""
        s, q = support_f, query_f
        if self.metric == "cosine":
            sim = F.normalize(q, dim=-1).bmm(F.normalize(s, dim=-1).transpose(1, 2))  # (E, Q, S)
        else:
            sim = -torch.cdist(q, s).pow(2)
        logits = sim.new_full((*sim.shape[:2], ways), float("-inf"))
        return logits.scatter_reduce(2, support_y.unsqueeze(1).expand_as(sim), sim, reduce="amax")
