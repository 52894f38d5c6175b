"""Prototypical Networks (Snell et al., NeurIPS 2017), as a plugin.

Queries are classified by negative squared Euclidean distance to class means of the
support embeddings; trained episodically end to end.
"""
from __future__ import annotations

import torch

from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method


@register_method("protonet")
class ProtoNet(FewShotMethod):
    """ProtoNet: negative squared Euclidean distance to class prototypes.

    Args:
        backbone: embedding network (``(B, 3, H, W)`` -> ``(B, D)``).
        temperature: logits are ``-d^2 / temperature``.
        pretrained_backbone: start the embedding from the suite's cached base-class pretraining
            instead of from scratch, then train episodically. Snell et al. train from scratch
            (``False``, the default).
    """

    training_stages = ("episodic",)

    def __init__(
        self, backbone, image_size: int = 84, temperature: float = 1.0, pretrained_backbone: bool = False
    ) -> None:
        super().__init__(backbone, image_size)
        self.temperature = temperature
        self.prototypes: torch.Tensor | None = None

    def fit_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        """Prototypes: class means of the support embeddings, ``(ways, D)``."""
        self.prototypes = self.class_means(self.backbone(support_x), support_y, self.num_ways(support_y))

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        """``(Q, 3, H, W)`` -> ``(Q, ways)``: ``-d^2 / temperature`` to the prototypes."""
        return -self.squared_distances(self.backbone(query_x), self.prototypes) / self.temperature

    # ------------------------------------------------------------------ batched evaluation
    def supports_batched_evaluation(self) -> bool:
        """Always: nothing is trained per episode (prototypes and distances batch over episodes)."""
        return True

    def episode_bytes(self, support: int, queries: int, image_size: int) -> int:
        """The episode's images and features (float32); the backbone runs in fixed chunks of images."""
        return 4 * (support + queries) * (3 * image_size**2 + 2 * self.backbone.feature_dim(image_size))

    def image_embedding(self):
        """The backbone (frozen at test): each image is embedded once per evaluation."""
        return self.backbone

    def evaluate_embedded(self, support_f, support_y, query_f, seeds, ways) -> torch.Tensor:
        """``E`` episodes at once from their images' features: every episode's prototypes, then
        ``-d^2 / temperature``. ``(E, S, D)``, ``(E, S)``, ``(E, Q, D)`` -> ``(E, Q, ways)``.
        Nothing is drawn from the RNG (``seeds`` unused)."""
        e = support_f.shape[0]
        labels = support_y + ways * torch.arange(e, device=support_y.device).unsqueeze(1)  # (E, S): class of E*ways
        prototypes = self.class_means(support_f.flatten(0, 1), labels.flatten(), e * ways).view(e, ways, -1)
        return -torch.cdist(query_f, prototypes).pow(2) / self.temperature
