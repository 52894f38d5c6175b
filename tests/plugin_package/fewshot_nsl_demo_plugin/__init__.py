"""A third-party fewshot-nsl method: cosine similarity to class centroids, no training."""
import torch

from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method


@register_method("demo_centroid")
class DemoCentroid(FewShotMethod):
    """Demo plugin (third-party package): cosine similarity to class centroids of random features."""

    training_stages = ()

    def __init__(self, backbone, image_size: int = 84, scale: float = 10.0):
        super().__init__(backbone, image_size)
        self.scale = scale

    def fit_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        """``(S, 3, H, W)``, ``(S,)`` -> class centroids ``(ways, D)``."""
        f = torch.nn.functional.normalize(self.backbone(support_x), dim=1)
        self.centroids = torch.stack([f[support_y == k].mean(0) for k in range(self.num_ways(support_y))])

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        """``(Q, 3, H, W)`` -> logits ``(Q, ways)``."""
        q = torch.nn.functional.normalize(self.backbone(query_x), dim=1)
        return self.scale * q @ self.centroids.T
