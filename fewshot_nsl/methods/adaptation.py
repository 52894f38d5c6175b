"""Gradient-based adaptation shared by the MAML-style methods: the ``higher`` inner loop and its helpers.

:func:`sgd_inner_loop` is the one place where an inner loop is written out: plain SGD steps on a
support loss over a chosen subset of a module's parameters, through
``higher.innerloop_ctx(net, opt, copy_initial_weights=False)``, so the fast weights start from (and
differentiate back to) the module's own parameters, which are never modified. The MAML plugin adapts
all parameters of backbone + head; ``meta_static_nsn`` adapts only the similarity matrices ``M_s``
and the head (frozen parameters are carried through unchanged).
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Sequence, Tuple

import higher
import torch
from torch import nn

from ..errors import ConfigError


def sgd_inner_loop(
    net: nn.Module,
    adapted: Sequence[torch.Tensor],
    lr: float,
    steps: int,
    support_loss: Callable[[nn.Module], torch.Tensor],
    differentiable: bool,
    first_order: bool = False,
) -> Tuple[nn.Module, List[torch.Tensor]]:
    """``steps`` SGD steps of ``support_loss`` over the parameters ``adapted`` of ``net``, through ``higher``.

    Gradients are enabled inside, so this also works when the harness calls it under ``torch.no_grad()``.

    Args:
        net: the module to adapt (its parameters are the initial weights; they are not modified).
        adapted: the parameters of ``net`` that take the SGD steps (the others stay fixed).
        lr: SGD step size.
        steps: number of SGD steps.
        support_loss: ``fnet -> scalar loss``, called with the patched module at every step.
        differentiable: make the fast weights differentiable w.r.t. the initial weights (meta-training)
            or not (test: the fast weights are returned detached).
        first_order: with ``differentiable``, drop the second-order terms (FOMAML): no graph is built
            through the inner loop, and the fast weights take the identity as their Jacobian w.r.t.
            the initial weights.

    Returns:
        The patched module and its fast weights, in ``net.parameters()`` order;
        ``fnet(x, params=fast)`` runs ``net`` with the adapted weights.
    """
    opt = torch.optim.SGD(adapted, lr=lr)
    with torch.enable_grad(), higher.innerloop_ctx(
        net, opt, copy_initial_weights=False, track_higher_grads=differentiable and not first_order
    ) as (fnet, diffopt):
        for _ in range(steps):
            diffopt.step(support_loss(fnet))
    fast = list(fnet.fast_params)
    if not differentiable:
        fast = [p.detach() for p in fast]
    elif first_order:
        fast = [p + (f - p).detach() for p, f in zip(net.parameters(), fast)]
    return fnet, fast


class AdaptedNetwork(NamedTuple):
    """A patched network with its fast weights, sliced to an episode's ways (what ``fit_support`` keeps).

    Attributes:
        fnet: patched module from :func:`sgd_inner_loop`.
        fast: its fast weights.
        ways: classes of the episode (the head may have more outputs).
    """

    fnet: nn.Module
    fast: List[torch.Tensor]
    ways: int

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, ways)`` with the fast weights."""
        return self.fnet(x, params=self.fast)[:, : self.ways]


def check_head_ways(method: str, head_ways: int, ways: int) -> int:
    """Refuse an episode with more classes than a method's head has outputs.

    Args:
        method: registered name of the method (for the message).
        head_ways: outputs of the method's linear head.
        ways: classes of the episode.

    Returns:
        ``ways``.

    Raises:
        ConfigError: ``ways > head_ways``, naming the setting to change.
    """
    if ways > head_ways:
        raise ConfigError(
            f"{method} was built with a {head_ways}-way head but the episode has {ways} ways; "
            f"set methods: {{{method}: {{method_options: {{ways: {ways}}}}}}}"
        )
    return ways


def use_batch_statistics(module: nn.Module) -> None:
    """Make every BatchNorm in ``module`` normalise with batch statistics, also in eval mode (Finn et al.'s MAML)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
