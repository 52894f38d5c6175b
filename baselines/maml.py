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

import higher
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method


def use_batch_statistics(module: nn.Module) -> None:
    """Make every BatchNorm in ``module`` normalise with batch statistics, also in eval mode."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None


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
        # (patched network, fast weights, episode ways) of the last fit_support; a tuple,
        # so that it is not registered as a submodule.
        self._adapted: Optional[Tuple[nn.Module, List[torch.Tensor], int]] = None

    def network(self) -> nn.Module:
        """Backbone and head as one module ``(B, 3, H, W) -> (B, ways)`` (shares their parameters)."""
        return nn.Sequential(self.backbone, self.head)

    def _check_ways(self, support_y: torch.Tensor) -> int:
        ways = self.num_ways(support_y)
        if ways > self.ways:
            from fewshot_nsl.errors import ConfigError

            raise ConfigError(
                f"maml was built with a {self.ways}-way head but the episode has {ways} ways; "
                f"set methods: {{maml: {{method_options: {{ways: {ways}}}}}}}"
            )
        return ways

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int, track_higher_grads: bool
    ) -> Tuple[nn.Module, List[torch.Tensor]]:
        """Inner loop: ``steps`` SGD steps on the support cross-entropy.

        Args:
            support_x: ``(S, 3, H, W)`` images.
            support_y: ``(S,)`` labels in ``0..ways-1``.
            steps: number of SGD steps.
            track_higher_grads: make the fast weights differentiable w.r.t. the initial weights
                (training: through the inner loop, or by the identity with ``first_order``) or not (test).

        Returns:
            The patched network and its fast weights; ``fnet(x, params=fast)`` -> ``(B, self.ways)``.
        """
        ways = self._check_ways(support_y)
        net = self.network()
        opt = torch.optim.SGD(net.parameters(), lr=self.inner_lr)
        first_order = track_higher_grads and self.first_order
        with higher.innerloop_ctx(
            net, opt, copy_initial_weights=False, track_higher_grads=track_higher_grads and not first_order
        ) as (fnet, diffopt):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fnet(support_x)[:, :ways], support_y))
        fast = list(fnet.fast_params)
        if first_order:
            # FOMAML: the adapted values, with the identity as their Jacobian w.r.t. the initial weights
            # (no graph through the inner loop is built at all).
            fast = [p + (f - p).detach() for p, f in zip(net.parameters(), fast)]
        return fnet, fast

    def fit_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        """Adapt a copy of the weights (never the initial weights), also under ``torch.no_grad()``."""
        with torch.enable_grad():
            fnet, fast = self.adapt(support_x, support_y, self.inner_steps_test, track_higher_grads=False)
        self._adapted = (fnet, [p.detach() for p in fast], self.num_ways(support_y))

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        """``(Q, 3, H, W)`` -> logits ``(Q, ways)`` with the adapted weights."""
        if self._adapted is None:
            raise RuntimeError("maml: call fit_support before forward")
        fnet, fast, ways = self._adapted
        return fnet(query_x, params=fast)[:, :ways]

    def loss(self, support_x, support_y, query_x, query_y) -> torch.Tensor:
        """Query cross-entropy after the differentiable inner loop (meta-gradient flows to the init)."""
        fnet, fast = self.adapt(support_x, support_y, self.inner_steps, track_higher_grads=True)
        self._adapted = (fnet, fast, self.num_ways(support_y))
        logits = self(query_x)
        self._adapted = None  # do not keep the episode's graph alive
        return F.cross_entropy(logits, query_y)
