"""A few-shot method with no host synchronisation of its own, for tests of the harness's (``test_input_pipeline``;
imported by the subprocesses those tests start, so it stays light)."""
from __future__ import annotations

import time

import torch

from fewshot_nsl.methods.base import FewShotMethod


class NearestMean(FewShotMethod):
    """Nearest class mean of the raw pixels, with no host synchronisation of its own (``ways`` is given).

    Args:
        ways: classes per episode (given, not read from the labels).
        delay: seconds to sleep in every ``forward`` (to make an evaluation last long enough to be killed).
        interrupt_at: raise ``KeyboardInterrupt`` in the ``fit_support`` of this episode (0-based; -1: never).
    """

    training_stages = ()

    def __init__(self, ways: int = 5, delay: float = 0.0, interrupt_at: int = -1) -> None:
        super().__init__(torch.nn.Identity(), 16)
        self.ways, self.delay, self.interrupt_at, self.calls = ways, delay, interrupt_at, 0

    def fit_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls += 1
        x = support_x.flatten(1)  # (S, D)
        sums = x.new_zeros(self.ways, x.shape[1]).index_add_(0, support_y, x)
        counts = x.new_zeros(self.ways).index_add_(0, support_y, torch.ones_like(x[:, 0]))
        self.protos = sums / counts[:, None]  # (ways, D)

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        return -torch.cdist(query_x.flatten(1), self.protos).pow(2)  # (n_query, ways)
