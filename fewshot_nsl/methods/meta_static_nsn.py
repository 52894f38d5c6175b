"""Meta-learned static NSN (NSL paper, Sec. 7.2, Eq. 7), through ``higher``.

1. Pretraining "with identity similarity": the plain backbone is pretrained on the base classes
   (the harness's cached pretraining, shared with ``static_nsn`` and the finetuning and
   nearest-neighbour baselines).
2. :meth:`MetaStaticNSN.after_pretrain` wraps every conv as a static :class:`~fewshot_nsl.nn.NSConv2d`
   with ``M_s = I`` and freezes the conv weights ``W`` and the batch norm (eval mode, base-class
   running statistics, frozen affine). The meta-parameters are the initial ``M_s`` of every layer
   and a ``ways``-way linear head.
3. Episodic meta-training (MAML, Finn et al. 2017): for each base-class episode, ``inner_steps`` SGD
   steps on the support loss update only ``M_s`` and the head (``M' = M - eta * grad_M L``), and the
   query loss after them is back-propagated into the initial ``M_s`` and head (second order by
   default; ``first_order=True`` drops the second-order terms).
4. Test: the same inner loop (``inner_steps_test`` steps) on the support set, then the queries are
   classified with the adapted ``M_s`` and head. The meta-learned initial values are never modified.

The inner loop is :func:`~fewshot_nsl.methods.adaptation.sgd_inner_loop` (shared with the MAML
plugin): ``higher.innerloop_ctx(net, opt, copy_initial_weights=False)``, so the fast weights start
from (and differentiate back to) the method's own parameters. Frozen parameters do not require grad
and are not in the inner optimiser: they are carried through unchanged.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..nn import NSConv2d, similarity_parameters, similarity_regularization, wrap_convs_static
from ..registry import register_method
from .adaptation import AdaptedNetwork, check_head_ways, sgd_inner_loop
from .base import FewShotMethod
from .static_nsn import AUTHORS_UNS_L2, STRUCTURES


@register_method("meta_static_nsn")
class MetaStaticNSN(FewShotMethod):
    """MAML over the static similarity matrices ``M_s`` and a linear head, on a frozen pretrained backbone.

    Args:
        backbone: plain feature extractor, pretrained on the base classes by the harness.
        image_size: input side, to size the head.
        structure: ``"dns"`` or ``"uns"`` static ``M_s``.
        ways: outputs of the linear head (episodes may have fewer ways, not more).
        inner_lr: SGD step size of the inner loop (MAML: 0.01).
        inner_steps: inner steps during meta-training (MAML: 5).
        inner_steps_test: inner steps at evaluation (MAML: 10).
        first_order: drop second-order terms from the meta-gradient.
        similarity_l2: coefficient of ``0.5 * sum M_s^2`` on the initial ``M_s`` added to the
            meta-training loss; ``None``: the authors' 5e-3 for UNS, 0 for DNS.
        similarity_l2_centered: penalise ``M_s - I`` instead of ``M_s``.
    """

    training_stages = ("pretrain", "episodic")

    def __init__(
        self,
        backbone,
        image_size: int = 84,
        structure: str = "dns",
        ways: int = 5,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        inner_steps_test: int = 10,
        first_order: bool = False,
        similarity_l2: Optional[float] = None,
        similarity_l2_centered: bool = False,
    ) -> None:
        super().__init__(backbone, image_size)
        if structure not in STRUCTURES:
            raise ConfigError(f"meta_static_nsn structure must be one of {', '.join(STRUCTURES)}, got {structure!r}")
        if any(isinstance(m, NSConv2d) for m in backbone.modules()):
            raise ConfigError(
                "meta_static_nsn pretrains a plain backbone and wraps its convs itself; drop the 'conv:' setting "
                "and choose the similarity with method_options: {structure: dns|uns}"
            )
        self.structure = structure
        self.head = nn.Linear(backbone.feature_dim(image_size), ways)
        self.ways = ways
        self.inner_lr, self.inner_steps, self.inner_steps_test = inner_lr, inner_steps, inner_steps_test
        self.first_order = first_order
        self.similarity_l2 = (AUTHORS_UNS_L2 if structure == "uns" else 0.0) if similarity_l2 is None else similarity_l2
        self.similarity_l2_centered = similarity_l2_centered
        self.wrapped = False
        # the adapted network of the last fit_support (a tuple, so not registered as a submodule)
        self._adapted: Optional[AdaptedNetwork] = None

    # ------------------------------------------------------------------ setup
    def after_pretrain(self) -> None:
        """Wrap every conv as static NSConv2d (``M_s = I``); freeze ``W`` and BN; ``M_s`` and head stay trainable."""
        if self.wrapped:
            return
        wrap_convs_static(self.backbone, structure=self.structure)
        self.backbone.requires_grad_(False)
        for p in similarity_parameters(self.backbone):
            p.requires_grad_(True)
        self.wrapped = True
        self.backbone.eval()

    def train(self, mode: bool = True) -> "MetaStaticNSN":
        """As :meth:`torch.nn.Module.train`, but the wrapped backbone's BN always uses base-class statistics."""
        super().train(mode)
        if self.wrapped:
            self.backbone.eval()
        return self

    def regularization(self) -> torch.Tensor:
        """``similarity_l2 * 0.5 * sum M_s^2`` over the initial ``M_s`` (0 before wrapping or for DNS by default)."""
        if not self.similarity_l2:
            return super().regularization()
        return similarity_regularization(self.backbone, l2=self.similarity_l2, centered=self.similarity_l2_centered)

    # ------------------------------------------------------------------ inner loop
    def network(self) -> nn.Module:
        """Backbone and head as one module ``(B, 3, H, W) -> (B, ways)`` (shares their parameters)."""
        return nn.Sequential(self.backbone, self.head)

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int, track_higher_grads: bool
    ) -> Tuple[nn.Module, List[torch.Tensor]]:
        """Inner loop: ``steps`` SGD steps of the support cross-entropy over ``M_s`` and the head only.

        Args:
            support_x: ``(S, 3, H, W)`` images.
            support_y: ``(S,)`` labels in ``0..ways-1``.
            steps: number of SGD steps.
            track_higher_grads: make the fast weights differentiable w.r.t. the initial ``M_s`` and head
                (meta-training: through the steps, or by the identity with ``first_order``) or not (test).
                Gradients are enabled inside, so this also works under ``torch.no_grad()``.

        Returns:
            The patched network and its fast weights, in ``network().parameters()`` order;
            ``fnet(x, params=fast)`` -> ``(B, self.ways)``.
        """
        if not self.wrapped:
            raise RuntimeError("meta_static_nsn: call after_pretrain() (the harness does) before adapting")
        ways = check_head_ways("meta_static_nsn", self.ways, self.num_ways(support_y))
        return sgd_inner_loop(
            self.network(), similarity_parameters(self.backbone) + list(self.head.parameters()), self.inner_lr, steps,
            lambda fnet: F.cross_entropy(fnet(support_x)[:, :ways], support_y),
            differentiable=track_higher_grads, first_order=self.first_order,
        )

    # ------------------------------------------------------------------ the two calls
    def fit_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        """Adapt fast copies of ``M_s`` and head (never the initial values); works under ``torch.no_grad()``."""
        fnet, fast = self.adapt(support_x, support_y, self.inner_steps_test, track_higher_grads=False)
        self._adapted = AdaptedNetwork(fnet, fast, self.num_ways(support_y))

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        """``(Q, 3, H, W)`` -> logits ``(Q, ways)`` with the adapted ``M_s`` and head."""
        if self._adapted is None:
            raise RuntimeError("meta_static_nsn: call fit_support before forward")
        return self._adapted.logits(query_x)

    def loss(self, support_x, support_y, query_x, query_y) -> torch.Tensor:
        """Query cross-entropy after the differentiable inner loop (the meta-gradient reaches the initial ``M_s`` and head)."""
        fnet, fast = self.adapt(support_x, support_y, self.inner_steps, track_higher_grads=True)
        logits = AdaptedNetwork(fnet, fast, self.num_ways(support_y)).logits(query_x)
        return F.cross_entropy(logits, query_y)
