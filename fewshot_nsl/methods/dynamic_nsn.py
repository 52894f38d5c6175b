"""Dynamic NSN for few-shot learning (NSL paper, Sec. 7.2 "Dynamic NSN").

The backbone is a dynamic neural-similarity network: every conv is a dynamic
:class:`~fewshot_nsl.nn.NSConv2d` whose ``M_s(x) = I + predictor(x)`` is predicted from its
input: by default the SphereNet predictor of the paper's text (Sec. 3.3.1), with
``conv: {predictor: authors}`` the predictor of the authors' public code
(``nsl_image_recog/experiments_cifar10/dynamic_dns/architecture.py``, ``_combined_conv``), which the
``paper`` profile uses (see :mod:`fewshot_nsl.nn.sphere` and ``docs/protocols.md``). The whole network (conv weights and predictors) is trained on the base classes by the
harness's standard pretraining (backbone + linear head over all base classes); its cache key
differs from the plain CNN's because the conv spec does. At test the network is frozen, a new
linear classifier (logistic regression) is trained on the support features, and the queries
are classified with the dynamic network and that classifier.

The layer variant is chosen with the run's ``conv:`` key, merged over :attr:`DynamicNSN.default_conv`
(DNS, disjoint predictors, SphereNet predictor), e.g. ``conv: {structure: uns}``,
``conv: {sharing: shared}``, ``conv: {predictor: cnn}``, ``conv: {predictor: authors, hidden: 64}``
(see :func:`fewshot_nsl.nn.make_conv_factory`).
The head options default to the finetuning protocol of Chen et al. (ICLR 2019): SGD lr 0.01,
momentum 0.9, dampening 0.9, weight decay 1e-3, batch 4, 100 passes over the support set.

The head is made and trained in the dtype of the network's weights (float32,
:func:`~fewshot_nsl.methods.head_training.weights_dtype`), on the features cast to it, also under
``--precision bf16|fp16`` (where autocast gives bf16/fp16 features).

The predictors are regularised like the backbone (the pretraining's weight decay), as in the
authors' code; no extra term is added. The support features are computed once per episode
in the mode the harness sets (eval: BN with base-class statistics); the backbone is never
updated at test.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..nn import NSConv2d
from ..registry import register_method
from .base import FewShotMethod
from .batched import fit_linear_heads, linear_init, linear_logits, replay_draws, support_orders
from .head_training import OPTIMIZERS, fit_linear_head, weights_dtype


@register_method("dynamic_nsn")
class DynamicNSN(FewShotMethod):
    """Dynamic NSN backbone trained on the base classes; frozen at test, new linear head per episode.

    Args:
        backbone: feature extractor built with dynamic NSConv2d layers (the runner builds it from
            :attr:`default_conv` merged with the run's ``conv:``).
        image_size: input side, to size the head.
        epochs: passes of head training over the support set.
        batch_size: support images per step; ``None`` for full-batch steps.
        optimizer: ``"sgd"`` or ``"adam"``.
        lr: head learning rate.
        momentum: SGD momentum.
        dampening: SGD dampening (0.9 in Chen et al.'s code).
        weight_decay: head weight decay.
    """

    training_stages = ("pretrain",)
    default_conv = {"kind": "dynamic", "structure": "dns", "sharing": "disjoint", "predictor": "sphere"}

    def __init__(
        self,
        backbone,
        image_size: int = 84,
        epochs: int = 100,
        batch_size: Optional[int] = 4,
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        dampening: float = 0.9,
        weight_decay: float = 1e-3,
    ) -> None:
        super().__init__(backbone, image_size)
        if not any(isinstance(m, NSConv2d) and m.mode == "dynamic" for m in backbone.modules()):
            raise ConfigError(
                "dynamic_nsn needs a backbone with dynamic NSConv2d layers; keep conv: {kind: dynamic} "
                "(or leave 'conv:' out) and choose structure/sharing/predictor there"
            )
        self.check_choice("optimizer", optimizer, OPTIMIZERS)
        self.feature_dim = backbone.feature_dim(image_size)
        self.epochs, self.batch_size, self.optimizer = epochs, batch_size, optimizer
        self.lr, self.momentum, self.dampening, self.weight_decay = lr, momentum, dampening, weight_decay
        # head of the last fit_support; a tuple, so it is not registered as a submodule.
        self._episode: Optional[tuple] = None

    def fit_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        """Train a new linear head on the frozen features of ``(S, 3, H, W)``, ``(S,)``; works under ``no_grad``."""
        dtype = weights_dtype(self.backbone)  # not the features' (bf16/fp16 under autocast)
        with torch.no_grad():
            features = self.backbone(support_x).to(dtype)  # (S, D), computed once
        head = nn.Linear(self.feature_dim, self.num_ways(support_y)).to(features.device, dtype)
        fit_linear_head(
            head, features, support_y, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
            momentum=self.momentum, dampening=self.dampening, weight_decay=self.weight_decay, optimizer=self.optimizer,
        )  # fmt: skip
        head.requires_grad_(False)
        self._episode = (head,)

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        """``(Q, 3, H, W)`` -> logits ``(Q, ways)``: frozen dynamic NSN, episode head."""
        if self._episode is None:
            raise RuntimeError("dynamic_nsn: call fit_support before forward")
        (head,) = self._episode
        return head(self.backbone(query_x).to(head.weight.dtype))

    # ------------------------------------------------------------------ batched evaluation
    def supports_batched_evaluation(self) -> bool:
        """Always: the network is frozen at test, only the heads are trained per episode."""
        return True

    def episode_bytes(self, support: int, queries: int, image_size: int) -> int:
        """Features of the episode's images and its head's training tensors (the backbone runs in fixed chunks)."""
        return 8 * (support + queries) * self.feature_dim * 4

    def image_embedding(self):
        """The frozen dynamic NSN (its similarities are predicted from each image alone): each image is embedded
        once per evaluation."""
        return self.backbone

    def evaluate_embedded(self, support_f, support_y, query_f, seeds, ways) -> torch.Tensor:
        """``E`` episodes from the frozen dynamic NSN's features of their images: ``E`` heads trained side by side
        (:func:`~fewshot_nsl.methods.batched.fit_linear_heads`) from the initial weights and support orders each
        episode's seed gives ``fit_support``, in the network's weights' dtype (the features cast to it).
        ``(E, S, D)``, ``(E, S)``, ``(E, Q, D)`` -> ``(E, Q, ways)``."""
        device, n, dtype = support_f.device, support_f.shape[1], weights_dtype(self.backbone)
        support = support_f.to(dtype)

        def draw():
            weight, bias = linear_init(self.feature_dim, ways, device, dtype)
            return weight, bias, support_orders(n, self.epochs, self.batch_size, device)

        weight, bias, orders = replay_draws(seeds, device, draw)
        weight, bias = fit_linear_heads(
            weight, bias, support, support_y, orders, batch_size=self.batch_size, lr=self.lr,
            momentum=self.momentum, dampening=self.dampening, weight_decay=self.weight_decay,
            optimizer=self.optimizer,
        )  # fmt: skip
        return linear_logits(weight, bias, query_f.to(dtype))
