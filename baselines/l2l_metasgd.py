"""Meta-SGD (Li et al., 2017) from learn2learn, brought in as a plugin of this suite.

This file shows how to wrap an outside library's algorithm as a method: the network is the
backbone plus a linear head, :class:`learn2learn.algorithms.MetaSGD` adapts a clone of it on
the support set with learned per-parameter step sizes, and the clone classifies the queries.
The step sizes (``lrs``) are parameters of this method, so the harness meta-trains them with
the initial weights.

learn2learn is optional (``make install`` adds it in a checkout; with pip, the two commands of
the README's "Install as a package" section: ``pip install "gym>=0.26"`` and
``pip install --no-deps --config-settings=--build-option=build_ext learn2learn==0.2.0``). Without it (or without ``gym``, which its
import needs) this file raises ImportError and ``--list`` shows one line saying so. Because
``import learn2learn`` takes several seconds (it pulls in torchvision models and gym), the
import happens when the method is built, not when the plugin is discovered.

Batch norm uses batch statistics, also in eval mode, as in MAML (``fewshot_nsl.methods.use_batch_statistics``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_nsl.methods import AdaptedNetwork, GradientAdaptedMethod, check_head_ways, use_batch_statistics
from fewshot_nsl.registry import register_method

_MISSING = [name for name in ("learn2learn", "gym") if importlib.util.find_spec(name) is None]
if _MISSING:
    raise ImportError(
        f"the optional package {' and '.join(_MISSING)} is not installed; install it with "
        f"`pip install \"gym>=0.26\" && pip install --no-deps --config-settings=--build-option=build_ext "
        f"learn2learn==0.2.0` (in a checkout: `make install`)"
    )


def _metasgd_class() -> Any:
    """``learn2learn.algorithms.MetaSGD``, imported on first use (gym's notice on stderr hidden)."""
    with contextlib.redirect_stderr(io.StringIO()):
        import learn2learn
    return learn2learn.algorithms.MetaSGD


@register_method("l2l_metasgd")
class L2LMetaSGD(GradientAdaptedMethod):
    """Meta-SGD via learn2learn: learned initial weights and per-parameter inner step sizes.

    ``fit_support``, ``forward`` and ``loss`` are :class:`~fewshot_nsl.methods.GradientAdaptedMethod`'s;
    the inner loop is learn2learn's (:meth:`adapted_network`), over every parameter of backbone + head.

    Args:
        backbone: feature extractor; its BN layers are switched to batch statistics.
        image_size: input side, to size the head.
        ways: outputs of the linear head (episodes may have fewer ways, not more).
        lr: initial value of every per-parameter step size.
        inner_steps: adaptation steps during meta-training (Li et al.: 1).
        inner_steps_test: adaptation steps at evaluation (Li et al.: 1).
        first_order: drop second-order terms from the meta-gradient.
    """

    training_stages = ("episodic",)
    transductive = True  # BN with batch statistics at test, as MAML

    def __init__(
        self,
        backbone,
        image_size: int = 84,
        ways: int = 5,
        lr: float = 0.01,
        inner_steps: int = 1,
        inner_steps_test: int = 1,
        first_order: bool = False,
    ) -> None:
        super().__init__(backbone, image_size, ways, inner_steps, inner_steps_test, first_order)
        self._MetaSGD = _metasgd_class()
        use_batch_statistics(self.backbone)
        self.head = nn.Linear(backbone.feature_dim(image_size), ways)
        self.lrs = nn.ParameterList([nn.Parameter(torch.full_like(p, lr)) for p in self.network().parameters()])

    def adapted_network(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int, differentiable: bool
    ) -> AdaptedNetwork:
        """A learn2learn clone adapted by ``steps`` Meta-SGD steps (the initial weights stay untouched);
        at test (``differentiable=False``) first order, with gradients enabled, so it works under ``torch.no_grad()``."""
        ways = check_head_ways("l2l_metasgd", self.ways, self.num_ways(support_y))
        first_order = self.first_order if differentiable else True
        with torch.enable_grad():
            learner = self._MetaSGD(self.network(), lrs=self.lrs, first_order=first_order).clone()
            for _ in range(steps):
                learner.adapt(F.cross_entropy(learner(support_x)[:, :ways], support_y))
        return AdaptedNetwork(learner, None, ways)
