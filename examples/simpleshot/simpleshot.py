"""SimpleShot (Wang et al., 2019, "SimpleShot: Revisiting Nearest-Neighbor Classification for Few-Shot
Learning"), written as a plugin on the base-class hook :meth:`FewShotMethod.fit_base`.

The backbone is pretrained with a linear head on all base classes (the suite's cached pretraining). The harness
then hands :meth:`fit_base` the pretrained backbone's features of every base-class training image; SimpleShot
keeps their mean. At test, support and query features are centred on that mean ("CL2N": centre, then L2-normalise)
and each query goes to the nearest class centroid (Euclidean distance).

Run it (from a checkout; any folder of plugins works the same way)::

    fewshot-nsl --plugins examples/simpleshot --method simpleshot --profile smoke

Options: ``norm``: ``cl2n`` (centre + L2, SimpleShot's best), ``l2n`` (L2 only, ignores the base classes) or
``un`` (raw features).

It also shows the optional batched evaluation of a method that embeds each image by itself: ``image_embedding``
names that function and ``evaluate_embedded`` classifies many episodes from their embeddings, so the harness embeds
each distinct test image once per evaluation. Without these three methods the plugin works the same, one episode at
a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method


@register_method("simpleshot")
class SimpleShot(FewShotMethod):
    """Nearest centroid on pretrained features centred on the base-class mean and L2-normalised (plugin example)."""

    training_stages = ("pretrain",)

    def __init__(self, backbone, image_size: int = 84, norm: str = "cl2n") -> None:
        super().__init__(backbone, image_size)
        self.check_choice("norm", norm, ("cl2n", "l2n", "un"))
        self.norm = norm
        # a buffer: saved in method.pt with the backbone, so a resumed run has it too
        self.register_buffer("base_mean", torch.zeros(backbone.feature_dim(image_size)))
        self.centroids: torch.Tensor | None = None

    def fit_base(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """``(N, D)`` base-class features, ``(N,)`` labels: keep the mean feature ``(D,)``."""
        self.base_mean.copy_(features.mean(0))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, D)`` transformed features."""
        f = self.backbone(x)
        if self.norm == "cl2n":
            f = f - self.base_mean
        return F.normalize(f, dim=1) if self.norm in ("cl2n", "l2n") else f

    def fit_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        self.centroids = self.class_means(self._embed(support_x), support_y, self.num_ways(support_y))  # (ways, D)

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        return -self.squared_distances(self._embed(query_x), self.centroids)  # (Q, ways)

    # ---------------------------------------------------------------- optional: many episodes at once
    def supports_batched_evaluation(self) -> bool:
        return True

    def image_embedding(self):
        """Each image's transformed feature depends on that image alone (frozen backbone, fixed base mean)."""
        return self._embed

    def evaluate_embedded(self, support_f, support_y, query_f, seeds, ways) -> torch.Tensor:
        """``(E, S, D)``, ``(E, S)``, ``(E, Q, D)`` -> ``(E, Q, ways)``: every episode's centroids, then distances."""
        onehot = F.one_hot(support_y, ways).to(support_f.dtype)  # (E, S, ways)
        centroids = onehot.transpose(1, 2) @ support_f / onehot.sum(1).unsqueeze(-1)  # (E, ways, D)
        return -torch.cdist(query_f, centroids).pow(2)
