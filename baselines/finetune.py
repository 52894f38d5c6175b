"""Finetuning baseline (Ravi & Larochelle, ICLR 2017; protocol of Chen et al., ICLR 2019), as a plugin.

The backbone is pretrained with a linear head on all base classes. For each test episode a
new linear head (and, with ``finetune_backbone=True``, a copy of the whole backbone) is
trained on the support set with SGD, then classifies the queries. Defaults follow Chen et
al.'s code (``baselinefinetune.py``): SGD lr 0.01, momentum 0.9, dampening 0.9, weight
decay 1e-3, batch 4, 100 passes over the support set.

With a frozen backbone the support features are computed once per episode. The pretrained
backbone is never modified: fine-tuning it works on a deep copy made for the episode. Batch
norm of that copy keeps the mode of the method (eval at test: pretrained running statistics).

The head is made and trained in the dtype of the backbone's weights (float32,
:func:`~fewshot_nsl.methods.head_training.weights_dtype`), on features cast to it, also under
``--precision bf16|fp16`` (where autocast gives bf16/fp16 features), on both paths.
"""
from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_nsl.methods import FewShotMethod, fit_linear_head, make_optimizer, train_on_support
from fewshot_nsl.methods.adaptation import episodes_network
from fewshot_nsl.methods.batched import (
    BatchedSGD,
    batching_pays,
    episode_cross_entropy_sum,
    fit_linear_heads,
    linear_init,
    linear_logits,
    replay_draws,
    support_orders,
    take,
    train_batched,
)
from fewshot_nsl.methods.head_training import weights_dtype
from fewshot_nsl.registry import register_method


@register_method("finetune")
class Finetune(FewShotMethod):
    """Pretrained backbone, new linear head (optionally the whole network) fine-tuned on the support set.

    Args:
        backbone: feature extractor, pretrained on the base classes by the harness.
        image_size: input side, to size the head.
        finetune_backbone: also fine-tune (a per-episode copy of) the backbone.
        lr: SGD learning rate.
        momentum: SGD momentum.
        dampening: SGD dampening (0.9 in Chen et al.'s code).
        weight_decay: SGD weight decay (applied to the head only).
        batch_size: support images per step; ``None``: the whole support set (full-batch steps, Ravi & Larochelle).
        epochs: passes over the support set.
    """

    training_stages = ("pretrain",)
    #: batch the whole-network branch on a CPU too (it is slower there, :func:`batching_pays`; tests set it)
    batched_on_cpu: bool = False

    def __init__(
        self,
        backbone,
        image_size: int = 84,
        finetune_backbone: bool = False,
        lr: float = 0.01,
        momentum: float = 0.9,
        dampening: float = 0.9,
        weight_decay: float = 1e-3,
        batch_size: Optional[int] = 4,
        epochs: int = 100,
    ) -> None:
        super().__init__(backbone, image_size)
        self.feature_dim = backbone.feature_dim(image_size)
        self.finetune_backbone = finetune_backbone
        self.lr, self.momentum, self.dampening = lr, momentum, dampening
        self.weight_decay, self.batch_size, self.epochs = weight_decay, batch_size, epochs
        # (episode backbone, head) of the last fit_support; a tuple, so neither is registered.
        self._episode: Optional[Tuple[nn.Module, nn.Linear]] = None

    def fit_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        """Train a new head (and a backbone copy) on ``(S, 3, H, W)``, ``(S,)``; works under no_grad.

        The support set is reshuffled on every pass, also when one batch holds all of it.
        """
        ways = self.num_ways(support_y)
        head = nn.Linear(self.feature_dim, ways).to(support_x.device, weights_dtype(self.backbone))
        sgd = dict(lr=self.lr, momentum=self.momentum, dampening=self.dampening)
        if self.finetune_backbone:
            backbone = copy.deepcopy(self.backbone)
            backbone.requires_grad_(True)
            groups = [
                {"params": head.parameters(), "weight_decay": self.weight_decay},
                {"params": backbone.parameters(), "weight_decay": 0.0},
            ]
            train_on_support(
                lambda idx: F.cross_entropy(head(backbone(support_x[idx])), support_y[idx]),
                len(support_y), make_optimizer("sgd", groups, **sgd), self.epochs, self.batch_size,
                support_x.device, shuffle_full_batch=True,
            )  # fmt: skip
        else:
            backbone = self.backbone
            with torch.no_grad():
                features = self.backbone(support_x)  # (S, D), computed once
            fit_linear_head(
                head, features, support_y, epochs=self.epochs, batch_size=self.batch_size,
                weight_decay=self.weight_decay, shuffle_full_batch=True, **sgd,
            )  # fmt: skip
        self._episode = (backbone, head)

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        """``(Q, 3, H, W)`` -> logits ``(Q, ways)`` of the episode's head."""
        if self._episode is None:
            raise RuntimeError("finetune: call fit_support before forward")
        backbone, head = self._episode
        return head(backbone(query_x))

    # ------------------------------------------------------------------ batched evaluation
    def supports_batched_evaluation(self) -> bool:
        """Batched with a frozen backbone (Chen et al.'s protocol: a new head per episode) and with the whole
        network fine-tuned (Ravi & Larochelle's protocol: per-episode copies of every backbone weight) where
        that pays: on accelerators, not on a CPU (:func:`~fewshot_nsl.methods.batched.batching_pays`)."""
        return not self.finetune_backbone or batching_pays(self, self.batched_on_cpu)

    def episode_bytes(self, support: int, queries: int, image_size: int) -> int:
        """Frozen backbone: features of the episode's images and its head's training tensors (the backbone runs
        in fixed chunks). Whole network: 3x the activations of the episode's images (the default) plus four
        copies of the backbone's weights (the episode's copy, its gradient, the momentum buffer, the step)."""
        if self.finetune_backbone:
            weights = sum(p.numel() * p.element_size() for p in self.backbone.parameters())
            return super().episode_bytes(support, queries, image_size) + 4 * weights
        return 8 * (support + queries) * self.feature_dim * 4

    def _episode_draws(self, seeds, ways: int, n: int, device: torch.device):
        """Each episode's initial head ``(E, ways, D)``, ``(E, ways)`` (in the backbone's weights' dtype) and support
        orders ``(E, epochs, S)``, drawn as ``fit_support`` draws them from the episode's seed."""
        dtype = weights_dtype(self.backbone)

        def draw():
            weight, bias = linear_init(self.feature_dim, ways, device, dtype)
            return weight, bias, support_orders(n, self.epochs, self.batch_size, device, shuffle_full_batch=True)

        return replay_draws(seeds, device, draw)

    def image_embedding(self):
        """The frozen backbone (Chen et al.'s protocol): each image is embedded once per evaluation. None when the
        whole network is fine-tuned (the features then depend on the episode)."""
        return None if self.finetune_backbone else self.backbone

    def evaluate_embedded(self, support_f, support_y, query_f, seeds, ways) -> torch.Tensor:
        """Frozen backbone, ``E`` episodes from their images' features: ``E`` heads trained together
        (:func:`~fewshot_nsl.methods.batched.fit_linear_heads`), each from the initial weights and support orders its
        episode's seed gives ``fit_support``, on the features cast to the heads' dtype (float32 under autocast).
        ``(E, S, D)``, ``(E, S)``, ``(E, Q, D)`` -> ``(E, Q, ways)``."""
        weight, bias, orders = self._episode_draws(seeds, ways, support_f.shape[1], support_f.device)
        weight, bias = fit_linear_heads(
            weight, bias, support_f, support_y, orders, batch_size=self.batch_size, lr=self.lr,
            momentum=self.momentum, dampening=self.dampening, weight_decay=self.weight_decay,
        )  # fmt: skip
        return linear_logits(weight, bias, query_f.to(weight.dtype))

    def evaluate_episodes(self, support_x, support_y, query_x, seeds, ways) -> torch.Tensor:
        """``E`` episodes side by side. Frozen backbone: :meth:`evaluate_embedded` of the images' features. Whole
        network: ``E`` copies of the backbone's weights and ``E`` heads trained together
        (:meth:`_finetune_episodes`), each from the initial head weights and support orders its episode's seed
        gives ``fit_support``. ``(E, S, 3, H, W)``, ``(E, S)``, ``(E, Q, 3, H, W)`` -> ``(E, Q, ways)``."""
        if not self.finetune_backbone:
            return super().evaluate_episodes(support_x, support_y, query_x, seeds, ways)
        if self.backbone.training or not self.supports_batched_evaluation():
            # in train mode BN would update running statistics; on a CPU batching does not pay: per episode
            return self.evaluate_one_by_one(support_x, support_y, query_x, seeds, ways)
        weight, bias, orders = self._episode_draws(seeds, ways, support_x.shape[1], support_x.device)
        return self._finetune_episodes(weight, bias, orders, support_x, support_y, query_x)

    def _finetune_episodes(self, weight: torch.Tensor, bias: torch.Tensor, orders: torch.Tensor,
                           support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
        """``fit_support``'s whole-network branch on ``E`` episodes at once: per-episode copies of every backbone
        weight (run under ``vmap``, :func:`~fewshot_nsl.methods.adaptation.episodes_network`) and heads, SGD as
        :func:`~fewshot_nsl.methods.head_training.make_optimizer` builds it (weight decay on the head only).

        Args:
            weight: ``(E, ways, D)`` and ``bias`` ``(E, ways)``: the episodes' initial heads.
            orders: ``(E, epochs, S)`` support orders.
            support_x: ``(E, S, 3, H, W)``; ``support_y`` ``(E, S)``; ``query_x`` ``(E, Q, 3, H, W)``.

        Returns:
            ``(E, Q, ways)`` query logits.
        """
        e = support_x.shape[0]
        fast = {n: p.detach().unsqueeze(0).expand(e, *p.shape).clone().requires_grad_(True)
                for n, p in self.backbone.named_parameters()}
        run = episodes_network(self.backbone, list(fast))
        w = weight.detach().clone().requires_grad_(True)
        b = bias.detach().clone().requires_grad_(True)
        opt = BatchedSGD([{"params": [w, b], "weight_decay": self.weight_decay},
                          {"params": list(fast.values()), "weight_decay": 0.0}],
                         self.lr, self.momentum, self.dampening)  # fmt: skip
        train_batched(
            lambda idx: episode_cross_entropy_sum(linear_logits(w, b, run(fast, take(support_x, idx))),
                                                  take(support_y, idx)),
            opt, orders, self.batch_size,
        )  # fmt: skip
        with torch.no_grad():
            return linear_logits(w, b, run(fast, query_x))
