"""Meta-learned static NSN (NSL paper, Sec. 7.2, Eq. 7), through ``higher``.

1. Pretraining "with identity similarity": the plain backbone is pretrained on the base classes
   (the harness's cached pretraining, shared with ``static_nsn`` and the finetuning and
   nearest-neighbour baselines).
2. :meth:`MetaStaticNSN.after_pretrain` wraps every conv as a static :class:`~fewshot_nsl.nn.NSConv2d`
   with ``M_s = I`` and freezes the conv weights ``W`` and the BN affine parameters. BN normalises
   with the statistics of the batch it is given (``batch_norm="batch"``, as Finn et al.'s MAML), or
   with the base-class running statistics of the pretraining (``batch_norm="running"``).
   The meta-parameters are the initial ``M_s`` of every layer and a ``ways``-way head (linear, or
   cosine with ``head="cosine"``: the normalised classifier of Chen et al. 2019 that the paper cites).
3. Episodic meta-training (MAML, Finn et al. 2017): for each base-class episode, ``inner_steps`` SGD
   steps on the support loss update only ``M_s`` (Eq. 7: ``M' = M - eta * grad_M L``); the head is a
   meta-learned initialisation that the inner loop leaves as it is (``adapt_head=True`` adapts it
   too). The query loss after the inner steps is back-propagated into the initial ``M_s`` and head
   (second order by default; ``first_order=True`` drops the second-order terms).
4. Test: the same inner loop (``inner_steps_test`` steps) on the support set, then the queries are
   classified with the adapted ``M_s`` (and head). The meta-learned initial values are never modified.

The inner loop and the episode calls are :class:`~fewshot_nsl.methods.adaptation.GradientAdaptedMethod`'s
(shared with the MAML plugin): ``higher.innerloop_ctx(net, opt, copy_initial_weights=False)``, so the
fast weights start from (and differentiate back to) the method's own parameters. Frozen parameters do
not require grad and are not in the inner optimiser: they are carried through unchanged.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..nn import NSConv2d, similarity_parameters, similarity_regularization, wrap_convs_static
from ..registry import register_method
from .adaptation import GradientAdaptedMethod, use_batch_statistics
from .static_nsn import STRUCTURES, default_similarity_l2

HEADS = ("linear", "cosine")
BATCH_NORMS = ("batch", "running")


class CosineHead(nn.Module):
    """Normalised (cosine) classifier of Chen et al. 2019 (``distLinear``, wyharveychen/CloserLookFewShot
    ``backbone.py`` l. 22-44): ``scale * g_c * cos(x, v_c)``.

    Chen's layer is a bias-free linear layer under ``WeightNorm(dim=0)`` applied to ``x / (|x| + 1e-5)``: its class
    weights are ``g_c * v_c / |v_c|`` with a learned per-class norm ``g_c`` (initialised, as WeightNorm does, to the
    initial ``|v_c|``), and the scores are multiplied by ``scale`` (2 for up to 200 classes).
    ``class_norm=False`` drops ``g`` (a plain cosine classifier, ``scale * cos(x, v_c)``).

    Args:
        in_features: ``D``.
        ways: outputs.
        scale: multiplies the scores (Chen et al.: 2 for up to 200 classes).
        class_norm: learn Chen's per-class norm ``g``.

    Shape:
        ``(B, D)`` -> ``(B, ways)``.
    """

    def __init__(self, in_features: int, ways: int, scale: float = 2.0, class_norm: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ways, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # as nn.Linear
        self.norm: Optional[nn.Parameter] = None
        if class_norm:
            self.norm = nn.Parameter(self.weight.detach().norm(dim=1).clone())
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / (x.norm(dim=1, keepdim=True) + 1e-5)
        w = F.normalize(self.weight, dim=1, eps=1e-12)
        if self.norm is not None:
            w = self.norm[:, None] * w
        return self.scale * x @ w.t()


@register_method("meta_static_nsn")
class MetaStaticNSN(GradientAdaptedMethod):
    """MAML over the static similarity matrices ``M_s`` (and a meta-learned head), on a frozen pretrained backbone.

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
        adapt_head: the inner loop updates the head as well as ``M_s`` (the paper's Eq. 7 and its test
            protocol update only ``M_s``: ``False``, the default). Beware: a head that is not adapted
            cannot follow the arbitrary label order of an episode; on glyphs (quick budget) ``False``
            measured at chance, ``True`` at ~80% 5-shot (docs/protocols.md). The paper profile uses ``True``.
        head: ``"linear"`` or ``"cosine"`` (:class:`CosineHead`).
        cosine_scale: scale of the cosine head.
        cosine_class_norm: the cosine head learns Chen et al.'s per-class norm (``distLinear`` under WeightNorm).
        loss_reduction: ``"mean"`` or ``"per_shot"`` (MAML's own arithmetic: the cross-entropy summed and divided
            by the shots; :func:`~fewshot_nsl.methods.adaptation.episode_cross_entropy`).
        grad_clip_value: clip each meta-gradient element to ``[-v, v]`` (MAML on Mini-ImageNet: 10); ``None``: off.
        batch_norm: ``"batch"``: every BN normalises with the statistics of the batch it is given
            (support batch in the inner loop, query batch at prediction), as Finn et al.'s MAML;
            ``"running"``: the pretraining's base-class running statistics.
    """

    training_stages = ("pretrain", "episodic")

    @classmethod
    def is_transductive(cls, options) -> bool:
        """``batch_norm: batch`` (the default) normalises the query batch with its own statistics at test."""
        return options.get("batch_norm", "batch") == "batch"

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
        adapt_head: bool = False,
        head: str = "linear",
        cosine_scale: float = 2.0,
        cosine_class_norm: bool = True,
        batch_norm: str = "batch",
        loss_reduction: str = "mean",
        grad_clip_value: Optional[float] = None,
    ) -> None:
        super().__init__(backbone, image_size, ways, inner_steps, inner_steps_test, first_order, inner_lr=inner_lr,
                         loss_reduction=loss_reduction, grad_clip_value=grad_clip_value)
        self.check_choice("structure", structure, STRUCTURES)
        if any(isinstance(m, NSConv2d) for m in backbone.modules()):
            raise ConfigError(
                "meta_static_nsn pretrains a plain backbone and wraps its convs itself; drop the 'conv:' setting "
                "and choose the similarity with method_options: {structure: dns|uns}"
            )
        self.check_choice("head", head, HEADS)
        self.check_choice("batch_norm", batch_norm, BATCH_NORMS)
        self.structure = structure
        dim = backbone.feature_dim(image_size)
        self.head: nn.Module = CosineHead(dim, ways, cosine_scale, cosine_class_norm) if head == "cosine" else nn.Linear(dim, ways)
        self.adapt_head, self.batch_norm = adapt_head, batch_norm
        self.similarity_l2 = default_similarity_l2(structure, similarity_l2)
        self.similarity_l2_centered = similarity_l2_centered
        self.wrapped = False

    # ------------------------------------------------------------------ setup
    def after_pretrain(self) -> None:
        """Wrap every conv as static NSConv2d (``M_s = I``); freeze ``W`` and BN affine; ``M_s`` and head stay trainable.

        With ``batch_norm="batch"`` the BN layers drop their running statistics and normalise with batch statistics.
        """
        if self.wrapped:
            return
        wrap_convs_static(self.backbone, structure=self.structure)
        if self.batch_norm == "batch":
            use_batch_statistics(self.backbone)
        self.backbone.requires_grad_(False)
        for p in similarity_parameters(self.backbone):
            p.requires_grad_(True)
        self.wrapped = True
        self.backbone.eval()

    def train(self, mode: bool = True) -> "MetaStaticNSN":
        """As :meth:`torch.nn.Module.train`, but the wrapped backbone stays in eval mode (BN never updates
        running statistics; with ``batch_norm="batch"`` it normalises with batch statistics in both modes)."""
        super().train(mode)
        if self.wrapped:
            self.backbone.eval()
        return self

    def regularization(self) -> torch.Tensor:
        """``similarity_l2 * 0.5 * sum M_s^2`` over the initial ``M_s`` (0 before wrapping or for DNS by default)."""
        if not self.similarity_l2:
            return super().regularization()
        return similarity_regularization(self.backbone, l2=self.similarity_l2, centered=self.similarity_l2_centered)

    # ------------------------------------------------------------------ what the inner loop adapts
    def check_ready(self) -> None:
        """Refuse to adapt before :meth:`after_pretrain` (the harness calls it) has wrapped the convs."""
        if not self.wrapped:
            raise RuntimeError("meta_static_nsn: call after_pretrain() (the harness does) before adapting")

    def adapted_parameters(self) -> List[nn.Parameter]:
        """The parameters the inner loop updates: every ``M_s``, plus the head's with ``adapt_head``."""
        return similarity_parameters(self.backbone) + (list(self.head.parameters()) if self.adapt_head else [])
