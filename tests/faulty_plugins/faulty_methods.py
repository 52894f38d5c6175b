"""Deliberately faulty methods for the numerical-guard tests (registered only in tests)."""
from __future__ import annotations

import torch

from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method


def _prototypes(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([f[y == k].mean(0) for k in range(int(y.max()) + 1)])


@register_method("nan_after_steps")
class NanAfterSteps(FewShotMethod):
    """ProtoNet whose training loss becomes NaN from the n-th call of loss()."""

    training_stages = ("episodic",)

    def __init__(self, backbone, image_size: int = 84, nan_from_call: int = 3) -> None:
        super().__init__(backbone, image_size)
        self.nan_from_call = nan_from_call
        self.calls = 0

    def fit_support(self, support_x, support_y):
        self.protos = _prototypes(self.backbone(support_x), support_y)

    def forward(self, query_x):
        return -torch.cdist(self.backbone(query_x), self.protos)

    def loss(self, support_x, support_y, query_x, query_y):
        self.calls += 1
        loss = super().loss(support_x, support_y, query_x, query_y)
        return loss * float("nan") if self.calls >= self.nan_from_call else loss


@register_method("nan_logits_on_odd_episodes")
class NanLogitsOnOddEpisodes(NanAfterSteps):
    """Untrained ProtoNet that returns NaN logits on every second evaluated episode."""

    training_stages = ()

    def __init__(self, backbone, image_size: int = 84) -> None:
        super().__init__(backbone, image_size, nan_from_call=10**9)
        self.evaluated = 0

    def forward(self, query_x):
        logits = super().forward(query_x)
        self.evaluated += 1
        return logits * float("nan") if self.evaluated % 2 == 0 else logits


class _Untrained(FewShotMethod):
    """Untrained ProtoNet base for the harness-check methods below (no training stage)."""

    training_stages = ()

    def fit_support(self, support_x, support_y):
        self.protos = _prototypes(self.backbone(support_x), support_y)

    def forward(self, query_x):
        return -torch.cdist(self.backbone(query_x), self.protos)


@register_method("logits_one_row")
class LogitsOneRow(_Untrained):
    """Returns logits of shape (1, ways): would broadcast into a plausible accuracy."""

    def forward(self, query_x):
        return super().forward(query_x)[:1]


@register_method("logits_flat")
class LogitsFlat(_Untrained):
    """Returns 1-D logits (n_query * ways,)."""

    def forward(self, query_x):
        return super().forward(query_x).flatten()


@register_method("raises_in_fit_support")
class RaisesInFitSupport(_Untrained):
    """Raises inside fit_support (a plugin bug)."""

    def fit_support(self, support_x, support_y):
        raise RuntimeError("plugin bug: index out of range")
