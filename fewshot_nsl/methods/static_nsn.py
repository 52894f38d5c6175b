"""Static NSN for few-shot learning (NSL paper, Sec. 7.2 "Static NSN").

A plain backbone is pretrained on the base classes (the harness's cached pretraining, shared
with the finetuning and nearest-neighbour baselines). For each test episode a copy of it has
every conv wrapped as a static :class:`~fewshot_nsl.nn.NSConv2d` with ``M_s = I`` (same output
as the pretrained conv); all ``M_s`` and a new linear head are fine-tuned on the support set
with the conv weights ``W`` frozen; then the ``M_s`` are folded into the convs
(``W' = M_s^T W``, :func:`~fewshot_nsl.nn.fold_all`) and the queries are classified at the cost
of the plain CNN.

Batch norm of the episode copy stays in eval mode: it normalises with the running statistics
of the base classes and its affine parameters are frozen (a 5-image batch gives no usable
statistics, and adapting BN would no longer be "only the similarity"). The pretrained
backbone is never modified: each episode works on its own deep copy, so nothing leaks from
one episode to the next.

Defaults follow the finetuning protocol of Chen et al. (ICLR 2019, ``baselinefinetune.py``:
SGD lr 0.01, momentum 0.9, dampening 0.9, weight decay 1e-3 on the head, batch 4, 100 passes),
the same as the ``finetune`` baseline, so the two differ only by the adapted ``M_s``. The
authors' L2 penalty 5e-3 on static UNS ``M_s`` is applied by default for ``structure="uns"``.

The support-set training (:func:`~fewshot_nsl.methods.head_training.make_optimizer`,
:func:`~fewshot_nsl.methods.head_training.train_on_support`, the head warm-up with
:func:`~fewshot_nsl.methods.head_training.fit_linear_head`) is :mod:`fewshot_nsl.methods.head_training`,
shared with ``dynamic_nsn`` and the ``finetune`` baseline; ``make_optimizer``, ``train_on_support`` and
``OPTIMIZERS`` can still be imported from here.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..nn import NSConv2d, fold_all, similarity_parameters, similarity_regularization, wrap_convs_static
from ..registry import register_method
from .base import FewShotMethod
from .head_training import OPTIMIZERS, fit_linear_head, make_optimizer, train_on_support

STRUCTURES = ("dns", "uns")
#: L2 on static UNS M_s in the authors' code (``tf.nn.l2_loss`` convention, see NSConv2d.l2_penalty).
AUTHORS_UNS_L2 = 5e-3


def default_similarity_l2(structure: str, similarity_l2: Optional[float]) -> float:
    """``similarity_l2`` if given, else the authors' choice: :data:`AUTHORS_UNS_L2` for UNS, 0 for DNS."""
    return (AUTHORS_UNS_L2 if structure == "uns" else 0.0) if similarity_l2 is None else similarity_l2


@register_method("static_nsn")
class StaticNSN(FewShotMethod):
    """Pretrained plain backbone; per episode, static ``M_s`` (from ``I``) and a new head fine-tuned on the support set.

    Args:
        backbone: plain feature extractor (no NSConv2d), pretrained on the base classes by the harness.
        image_size: input side, to size the head.
        structure: ``"dns"`` (diagonal ``M_s``, 9 values per 3x3 layer) or ``"uns"`` (full, 81).
        epochs: passes over the support set.
        batch_size: support images per step; ``None`` for full-batch steps.
        optimizer: ``"sgd"`` or ``"adam"``.
        lr: learning rate of the head (and of ``M_s`` unless ``similarity_lr`` is given).
        similarity_lr: learning rate of the ``M_s`` (``None``: ``lr``).
        momentum: SGD momentum.
        dampening: SGD dampening (0.9 in Chen et al.'s code).
        weight_decay: weight decay of the head (the ``M_s`` get ``similarity_l2`` instead).
        similarity_l2: coefficient of ``0.5 * sum M_s^2`` added to the support loss; ``None``
            gives the authors' 5e-3 for UNS and 0 for DNS.
        similarity_l2_centered: penalise ``M_s - I`` instead of ``M_s`` (a prior towards the pretrained conv).
        fold: fold the adapted ``M_s`` into plain convs for the query forward (same logits, plain-conv speed).
        head_warmup_epochs: passes training the head alone on the pretrained features (computed once,
            so nearly free) before the joint ``M_s`` + head passes ("linear probe, then fine-tune");
            0 (default) is the paper's joint fine-tuning from a random head.
    """

    training_stages = ("pretrain",)

    def __init__(
        self,
        backbone,
        image_size: int = 84,
        structure: str = "dns",
        epochs: int = 100,
        batch_size: Optional[int] = 4,
        optimizer: str = "sgd",
        lr: float = 0.01,
        similarity_lr: Optional[float] = None,
        momentum: float = 0.9,
        dampening: float = 0.9,
        weight_decay: float = 1e-3,
        similarity_l2: Optional[float] = None,
        similarity_l2_centered: bool = False,
        fold: bool = True,
        head_warmup_epochs: int = 0,
    ) -> None:
        super().__init__(backbone, image_size)
        self.check_choice("structure", structure, STRUCTURES)
        self.check_choice("optimizer", optimizer, OPTIMIZERS)
        if any(isinstance(m, NSConv2d) for m in backbone.modules()):
            raise ConfigError(
                "static_nsn wraps the convs of a plain pretrained backbone itself; drop the 'conv:' setting "
                "and choose the similarity with method_options: {structure: dns|uns}"
            )
        self.feature_dim = backbone.feature_dim(image_size)
        self.structure = structure
        self.epochs, self.batch_size, self.optimizer = epochs, batch_size, optimizer
        self.lr = lr
        self.similarity_lr = lr if similarity_lr is None else similarity_lr
        self.momentum, self.dampening, self.weight_decay = momentum, dampening, weight_decay
        self.similarity_l2 = default_similarity_l2(structure, similarity_l2)
        self.similarity_l2_centered = similarity_l2_centered
        self.fold = fold
        self.head_warmup_epochs = head_warmup_epochs
        # (episode network, head) of the last fit_support; a tuple, so neither is registered.
        self._episode: Optional[Tuple[nn.Module, nn.Linear]] = None

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Tuple[nn.Module, nn.Linear]:
        """Fine-tune the ``M_s`` of a wrapped copy of the backbone and a new head on the support set.

        Args:
            support_x: ``(S, 3, H, W)`` images.
            support_y: ``(S,)`` labels in ``0..ways-1``.

        Returns:
            The adapted copy (static NSConv2d layers, unfolded; only its ``M_s`` require grad)
            and the head ``(D,) -> (ways,)``. ``self.backbone`` is left untouched. Gradients are
            enabled inside, so this also works under ``torch.no_grad()``.
        """
        ways = self.num_ways(support_y)
        net = wrap_convs_static(copy.deepcopy(self.backbone), structure=self.structure)
        net.requires_grad_(False)
        net.eval()  # BN: base-class running statistics, frozen affine parameters
        sims: List[nn.Parameter] = similarity_parameters(net)
        for p in sims:
            p.requires_grad_(True)
        head = nn.Linear(self.feature_dim, ways).to(support_x.device, support_x.dtype)
        opt = make_optimizer(
            self.optimizer,
            [
                {"params": sims, "lr": self.similarity_lr, "weight_decay": 0.0},
                {"params": list(head.parameters()), "lr": self.lr, "weight_decay": self.weight_decay},
            ],
            self.lr, self.momentum, self.dampening,
        )  # fmt: skip

        if self.head_warmup_epochs > 0:
            with torch.no_grad():
                features = net(support_x)  # M_s = I: the pretrained features
            fit_linear_head(
                head, features, support_y, epochs=self.head_warmup_epochs, batch_size=self.batch_size,
                lr=self.lr, momentum=self.momentum, dampening=self.dampening, weight_decay=self.weight_decay,
                optimizer=self.optimizer,
            )  # fmt: skip

        def loss_fn(idx: torch.Tensor) -> torch.Tensor:
            loss = F.cross_entropy(head(net(support_x[idx])), support_y[idx])
            if self.similarity_l2:
                loss = loss + similarity_regularization(net, l2=self.similarity_l2, centered=self.similarity_l2_centered)
            return loss

        train_on_support(loss_fn, len(support_y), opt, self.epochs, self.batch_size, support_x.device)
        return net, head

    def fit_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        """Adapt (on a copy) to ``(S, 3, H, W)``, ``(S,)``; works under ``torch.no_grad()``."""
        net, head = self.adapt(support_x, support_y)
        if self.fold:
            net = fold_all(net)
        net.requires_grad_(False)
        head.requires_grad_(False)
        self._episode = (net, head)

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        """``(Q, 3, H, W)`` -> logits ``(Q, ways)`` of the episode's adapted network and head."""
        if self._episode is None:
            raise RuntimeError("static_nsn: call fit_support before forward")
        net, head = self._episode
        return head(net(query_x))
