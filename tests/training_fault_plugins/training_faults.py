"""Plugin methods that fail where a researcher's own method fails first: in episodic training, in the
constructor, or on every test episode (registered only by ``tests/test_plugin_failures.py``)."""
from __future__ import annotations

import torch

from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method


class _Proto(FewShotMethod):
    def fit_support(self, support_x, support_y):
        f = self.backbone(support_x)
        self.protos = torch.stack([f[support_y == k].mean(0) for k in range(int(support_y.max()) + 1)])

    def forward(self, query_x):
        return -torch.cdist(self.backbone(query_x), self.protos)


@register_method("raises_in_training_loss")
class RaisesInTrainingLoss(_Proto):
    """Episodic training whose fit_support raises KeyError (a plugin bug met on the first training episode)."""

    training_stages = ("episodic",)

    def fit_support(self, support_x, support_y):
        raise KeyError("prototypes")


@register_method("raises_in_constructor")
class RaisesInConstructor(_Proto):
    """A constructor that multiplies by its option: a string option is a TypeError there."""

    training_stages = ()

    def __init__(self, backbone, image_size: int = 84, scale: float = 1.0) -> None:
        super().__init__(backbone, image_size)
        self.scale = scale * 1.5


@register_method("nan_on_every_episode")
class NanOnEveryEpisode(_Proto):
    """Non-finite logits on every test episode."""

    training_stages = ()

    def forward(self, query_x):
        return super().forward(query_x) * float("nan")


@register_method("stages_as_a_string")
class StagesAsAString(_Proto):
    """``training_stages = ("episodic")``: a missing comma makes it a string."""

    training_stages = ("episodic")
