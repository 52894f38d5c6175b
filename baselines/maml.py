"""MAML (Finn, Abbeel & Levine, ICML 2017), as a plugin, through ``higher``.

The network is the backbone plus a linear head with ``ways`` outputs. For every episode
the whole network takes ``inner_steps`` SGD steps on the support loss, starting from the
meta-learned initial weights, and the adapted ("fast") weights classify the queries.
Training back-propagates the query loss through the inner loop into the initial weights
(second order; ``first_order=True`` drops the second-order terms, as FOMAML).

Batch norm, as in Finn et al.'s code, always normalises with the statistics of the batch
it is given (support batch during adaptation, query batch at prediction): the backbone's
BN layers are built with ``track_running_stats=False``, so this holds in ``eval()`` mode
under the evaluation harness as well.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_nsl.methods import AdaptedNetwork, FewShotMethod, check_head_ways, sgd_inner_loop, use_batch_statistics
from fewshot_nsl.registry import register_method


@register_method("maml")
class MAML(FewShotMethod):
    """MAML: meta-learned initial weights, adapted by SGD on each support set.

    Args:
        backbone: feature extractor; its BN layers are switched to batch statistics.
        image_size: input side, to size the head.
        ways: outputs of the linear head (episodes may have fewer ways, not more).
        inner_lr: SGD step size of the inner loop (Finn et al.: 0.01).
        inner_steps: inner SGD steps during meta-training (Finn et al.: 5).
        inner_steps_test: inner SGD steps at evaluation (Finn et al.: 10).
        first_order: drop second-order terms from the meta-gradient (FOMAML).
    """

    training_stages = ("episodic",)

    def __init__(
        self,
        backbone,
        image_size: int = 84,
        ways: int = 5,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        inner_steps_test: int = 10,
        first_order: bool = False,
    ) -> None:
        super().__init__(backbone, image_size)
        use_batch_statistics(self.backbone)
        self.head = nn.Linear(backbone.feature_dim(image_size), ways)
        self.ways = ways
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.inner_steps_test = inner_steps_test
        self.first_order = first_order
        # the adapted network of the last fit_support (a tuple, so not registered as a submodule)
        self._adapted: Optional[AdaptedNetwork] = None

    def network(self) -> nn.Module:
        """Backbone and head as one module ``(B, 3, H, W) -> (B, ways)`` (shares their parameters)."""
        return nn.Sequential(self.backbone, self.head)

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int, track_higher_grads: bool
    ) -> Tuple[nn.Module, List[torch.Tensor]]:
        """Inner loop: ``steps`` SGD steps on the support cross-entropy (works under ``torch.no_grad()``).

        Args:
            support_x: ``(S, 3, H, W)`` images.
            support_y: ``(S,)`` labels in ``0..ways-1``.
            steps: number of SGD steps.
            track_higher_grads: make the fast weights differentiable w.r.t. the initial weights
                (training: through the inner loop, or by the identity with ``first_order``) or not (test).

        Returns:
            The patched network and its fast weights; ``fnet(x, params=fast)`` -> ``(B, self.ways)``.
        """
        ways = check_head_ways("maml", self.ways, self.num_ways(support_y))
        net = self.network()
        return sgd_inner_loop(
            net, list(net.parameters()), self.inner_lr, steps,
            lambda fnet: F.cross_entropy(fnet(support_x)[:, :ways], support_y),
            differentiable=track_higher_grads, first_order=self.first_order,
        )

    def fit_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        """Adapt a copy of the weights (never the initial weights), also under ``torch.no_grad()``."""
        fnet, fast = self.adapt(support_x, support_y, self.inner_steps_test, track_higher_grads=False)
        self._adapted = AdaptedNetwork(fnet, fast, self.num_ways(support_y))

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        """``(Q, 3, H, W)`` -> logits ``(Q, ways)`` with the adapted weights."""
        if self._adapted is None:
            raise RuntimeError("maml: call fit_support before forward")
        return self._adapted.logits(query_x)

    def loss(self, support_x, support_y, query_x, query_y) -> torch.Tensor:
        """Query cross-entropy after the differentiable inner loop (meta-gradient flows to the init)."""
        fnet, fast = self.adapt(support_x, support_y, self.inner_steps, track_higher_grads=True)
        self._adapted = AdaptedNetwork(fnet, fast, self.num_ways(support_y))
        logits = self(query_x)
        self._adapted = None  # do not keep the episode's graph alive
        return F.cross_entropy(logits, query_y)
