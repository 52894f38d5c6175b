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

The source's own arithmetic (cbfinn/maml, read in ``utils.py`` and ``maml.py``; docs/protocols.md) is
available as options, and the ``paper`` profile uses it: ``loss_reduction="per_shot"`` (the per-example
cross-entropy divided by K and summed, so the inner step on the mean loss is ``N * inner_lr``),
``grad_clip_value=10`` (every meta-gradient element clipped to +-10) and ``bn_scale=False``
(``tf.contrib.layers.batch_norm`` defaults: a learned shift, no learned scale; eps 1e-3 through
``backbone_options.bn_eps``).
"""
from __future__ import annotations

from torch import nn

from typing import Optional

from fewshot_nsl.methods import GradientAdaptedMethod, drop_batchnorm_scale, use_batch_statistics
from fewshot_nsl.registry import register_method


@register_method("maml")
class MAML(GradientAdaptedMethod):
    """MAML: meta-learned initial weights, adapted by SGD on each support set.

    The inner loop, ``fit_support``, ``forward`` and ``loss`` are
    :class:`~fewshot_nsl.methods.GradientAdaptedMethod`'s; MAML adapts every parameter of backbone + head.

    Args:
        backbone: feature extractor; its BN layers are switched to batch statistics.
        image_size: input side, to size the head.
        ways: outputs of the linear head (episodes may have fewer ways, not more).
        inner_lr: SGD step size of the inner loop (Finn et al.: 0.01).
        inner_steps: inner SGD steps during meta-training (Finn et al.: 5).
        inner_steps_test: inner SGD steps at evaluation (Finn et al.: 10).
        first_order: drop second-order terms from the meta-gradient (FOMAML).
        loss_reduction: ``"mean"`` cross-entropy, or ``"per_shot"``: summed and divided by the shots, as
            Finn et al.'s code (an inner step ``N`` times larger on an ``N``-way episode).
        grad_clip_value: clip each meta-gradient element to ``[-v, v]`` (Finn et al.: 10); ``None``: off.
        bn_scale: keep BN's learned scale; ``False`` drops it (Finn et al.'s ``tf.contrib.layers.batch_norm``).
    """

    training_stages = ("episodic",)
    transductive = True  # BN normalises the query batch with its own statistics (Finn et al.'s batch norm)

    def __init__(
        self,
        backbone,
        image_size: int = 84,
        ways: int = 5,
        inner_lr: float = 0.01,
        inner_steps: int = 5,
        inner_steps_test: int = 10,
        first_order: bool = False,
        loss_reduction: str = "mean",
        grad_clip_value: Optional[float] = None,
        bn_scale: bool = True,
    ) -> None:
        super().__init__(backbone, image_size, ways, inner_steps, inner_steps_test, first_order, inner_lr=inner_lr,
                         loss_reduction=loss_reduction, grad_clip_value=grad_clip_value)
        use_batch_statistics(self.backbone)
        if not bn_scale:
            drop_batchnorm_scale(self.backbone)
        self.head = nn.Linear(backbone.feature_dim(image_size), ways)
