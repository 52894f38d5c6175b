"""Gradient-based adaptation shared by the MAML-style methods: the ``higher`` inner loop, its helpers
and :class:`GradientAdaptedMethod`, the base class that owns the episode wrapper around it.

:func:`sgd_inner_loop` is the one place where an inner loop is written out: plain SGD steps on a
support loss over a chosen subset of a module's parameters, through
``higher.innerloop_ctx(net, opt, copy_initial_weights=False)``, so the fast weights start from (and
differentiate back to) the module's own parameters, which are never modified.

:class:`GradientAdaptedMethod` is what the MAML plugin, ``meta_static_nsn`` and the ``l2l_metasgd``
plugin derive from: backbone + head as one network, ``fit_support`` adapts it on the support set
(under ``torch.no_grad()`` too), ``forward`` classifies with the adapted weights, ``loss`` is the
query loss after a differentiable inner loop. A subclass names what it adapts
(:meth:`GradientAdaptedMethod.adapted_parameters`: all of backbone + head for MAML, the ``M_s`` and
optionally the head for ``meta_static_nsn``), or replaces the inner loop
(:meth:`GradientAdaptedMethod.adapted_network`: learn2learn's Meta-SGD); frozen parameters are
carried through unchanged.

At evaluation the same inner loop also runs on many episodes at once (:func:`batched_sgd_adaptation`, through
``torch.func``: the network is called with per-episode fast weights under ``vmap`` over the episode dimension,
a conv with batched weights becoming a grouped conv), for the methods that keep the standard inner loop
(:meth:`GradientAdaptedMethod.supports_batched_evaluation`); a subclass that replaces it stays on the
per-episode path.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import higher
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ..errors import ConfigError
from .base import FewShotMethod
from .batched import batching_pays  # noqa: F401  (re-exported; the policy lives with the batched tools)

#: How an episode's cross-entropy is reduced over its examples (:func:`episode_cross_entropy`).
LOSS_REDUCTIONS = ("mean", "per_shot")


def episode_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shots: int, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of one episode's batch, reduced over its examples.

    Args:
        logits: ``(B, ways)``.
        labels: ``(B,)`` in ``0..ways-1``.
        shots: support examples per class of the episode (``K``).
        reduction: ``"mean"``: the mean over the ``B`` examples. ``"per_shot"``: the sum over the examples
            divided by ``K``, as Finn et al.'s MAML code computes it (cbfinn/maml ``utils.py`` ``xent``: the
            per-example cross-entropy divided by ``update_batch_size``; ``maml.py`` sums it, through
            ``tf.gradients`` in the inner loop and ``tf.reduce_sum`` in the meta-loss). On an ``N``-way
            support set of ``N*K`` examples this is ``N`` times the mean, so an inner step of ``lr`` on it is
            a step of ``N * lr`` on the mean.

    Returns:
        Scalar loss.
    """
    if reduction == "per_shot":
        return F.cross_entropy(logits, labels, reduction="sum") / shots
    return F.cross_entropy(logits, labels)


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


def episodes_network(net: nn.Module, batched: Sequence[str]
                     ) -> Callable[[Dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """``net`` run on ``E`` episodes at once with per-episode copies of some of its parameters.

    The parameters named in ``batched`` are given per episode (a leading dimension ``E``); every other parameter
    and buffer is ``net``'s own, shared by the episodes (detached: nothing flows back to ``net``). Each episode
    runs as ``net`` runs one batch (``torch.func.vmap`` over the episodes, so a BatchNorm normalising with batch
    statistics uses each episode's own batch, and a conv with per-episode weights becomes a grouped conv).
    ``net`` must not update buffers in place (BN in eval mode, or without running statistics).

    Args:
        net: the module.
        batched: names (as in ``net.named_parameters()``) of the per-episode parameters.

    Returns:
        ``run(fast, x)``: ``fast`` maps each name of ``batched`` to an ``(E, *shape)`` tensor, ``x`` is
        ``(E, B, *in)``; returns ``(E, B, *out)``.
    """
    names = set(batched)
    shared = {n: t.detach() for n, t in list(net.named_parameters()) + list(net.named_buffers()) if n not in names}

    def one(fast: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(net, {**shared, **fast}, (x,))

    return vmap(one)


def episodes_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shots: int, reduction: str = "mean"
                           ) -> torch.Tensor:
    """Sum over ``E`` episodes of :func:`episode_cross_entropy` of each: ``(E, B, ways)``, ``(E, B)`` -> scalar
    (so each episode's own parameters get exactly their episode's gradient)."""
    e, b, ways = logits.shape
    total = F.cross_entropy(logits.reshape(e * b, ways), labels.reshape(e * b), reduction="sum")
    return total / shots if reduction == "per_shot" else total / b


def batched_sgd_adaptation(
    net: nn.Module,
    adapted: Sequence[str],
    lr: float,
    steps: int,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    ways: int,
    reduction: str = "mean",
) -> torch.Tensor:
    """The test-time inner loop of :func:`sgd_inner_loop` (not differentiable) on ``E`` episodes side by side.

    Every episode starts from ``net``'s weights and takes ``steps`` plain SGD steps of ``lr`` on its support
    loss (:func:`episode_cross_entropy` of the logits sliced to ``ways``) over the parameters named in
    ``adapted`` (the others stay ``net``'s); then its queries are classified with its fast weights. ``net`` is
    not modified. Gradients are enabled inside, so this works under ``torch.no_grad()``.

    Args:
        net: the network, ``(B, 3, H, W) -> (B, >= ways)``.
        adapted: names (as in ``net.named_parameters()``) of the parameters the steps update.
        lr: SGD step size.
        steps: number of SGD steps.
        support_x: ``(E, S, 3, H, W)``.
        support_y: ``(E, S)`` int64 labels in ``0..ways-1``.
        query_x: ``(E, Q, 3, H, W)``.
        ways: classes per episode.
        reduction: ``"mean"`` or ``"per_shot"`` (:func:`episode_cross_entropy`).

    Returns:
        ``(E, Q, ways)`` query logits with each episode's fast weights (no graph).
    """
    e, s = support_y.shape
    shots = max(1, s // ways)
    params = dict(net.named_parameters())
    fast = {n: params[n].detach().unsqueeze(0).expand(e, *params[n].shape).clone() for n in adapted}
    run = episodes_network(net, list(fast))
    with torch.enable_grad():
        for _ in range(steps):
            fast = {n: t.requires_grad_(True) for n, t in fast.items()}
            loss = episodes_cross_entropy(run(fast, support_x)[..., :ways], support_y, shots, reduction)
            grads = torch.autograd.grad(loss, list(fast.values()), allow_unused=True)
            fast = {n: t.detach() if g is None else (t - lr * g).detach() for (n, t), g in zip(fast.items(), grads)}
    with torch.no_grad():
        return run(fast, query_x)[..., :ways]


class AdaptedNetwork(NamedTuple):
    """A patched network with its fast weights, sliced to an episode's ways (what ``fit_support`` keeps).

    Attributes:
        fnet: patched module from :func:`sgd_inner_loop` (or any module holding adapted weights
            itself, such as a learn2learn clone).
        fast: its fast weights; ``None`` when ``fnet`` holds them itself.
        ways: classes of the episode (the head may have more outputs).
    """

    fnet: nn.Module
    fast: Optional[List[torch.Tensor]]
    ways: int

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, ways)`` with the fast weights."""
        out = self.fnet(x) if self.fast is None else self.fnet(x, params=self.fast)
        return out[:, : self.ways]


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


def drop_batchnorm_scale(module: nn.Module) -> None:
    """Remove the learned scale (``gamma``) of every BatchNorm in ``module``, keeping the shift (``beta``):
    ``tf.contrib.layers.batch_norm``'s defaults (``center=True, scale=False``), which Finn et al.'s MAML
    uses (cbfinn/maml ``utils.py`` ``normalize``)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            m.weight = None


class GradientAdaptedMethod(FewShotMethod):
    """Base class of the methods that adapt backbone + head by gradient steps on each support set.

    The subclass builds ``self.head`` (``(B, D) -> (B, ways)``) in its ``__init__`` and names what the
    inner loop updates (:meth:`adapted_parameters`); this class owns the rest: the network
    (:meth:`network`), the ``higher`` inner loop on the support cross-entropy (:meth:`adapt`),
    ``fit_support`` / ``forward`` at test and the episodic ``loss``. The initial weights are never
    modified; every episode adapts fast copies.

    Args:
        backbone: feature extractor.
        image_size: input side, to size the head.
        ways: outputs of the head (episodes may have fewer ways, not more).
        inner_steps: inner steps during meta-training.
        inner_steps_test: inner steps at evaluation.
        first_order: drop second-order terms from the meta-gradient.
        inner_lr: SGD step size of the inner loop (``None`` for a subclass that replaces the inner
            loop by its own, see :meth:`adapted_network`).
        loss_reduction: ``"mean"`` or ``"per_shot"`` (:func:`episode_cross_entropy`), for the support loss of
            the inner loop and the query loss of meta-training alike.
        grad_clip_value: clip every element of the meta-gradient to ``[-v, v]`` before the optimiser step
            (:meth:`clip_gradients`; Finn et al.: 10 on Mini-ImageNet); ``None``: no clipping.
    """

    #: the inner loop rebuilds the functional network at every step: ``--compile`` leaves these methods eager
    compilable = False
    #: batch the test-time adaptation on a CPU too (:func:`batching_pays`: it is slower there; tests set it)
    batched_on_cpu: bool = False

    def __init__(
        self,
        backbone,
        image_size: int = 84,
        ways: int = 5,
        inner_steps: int = 5,
        inner_steps_test: int = 10,
        first_order: bool = False,
        inner_lr: Optional[float] = None,
        *,
        loss_reduction: str = "mean",
        grad_clip_value: Optional[float] = None,
    ) -> None:
        super().__init__(backbone, image_size)
        self.check_choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
        if grad_clip_value is not None and not grad_clip_value > 0:
            raise ConfigError(f"grad_clip_value must be positive (got {grad_clip_value}); use null for no clipping")
        self.loss_reduction, self.grad_clip_value = loss_reduction, grad_clip_value
        self.ways = ways
        self.inner_lr, self.inner_steps, self.inner_steps_test = inner_lr, inner_steps, inner_steps_test
        self.first_order = first_order
        # the adapted network of the last fit_support (a tuple, so not registered as a submodule)
        self._adapted: Optional[AdaptedNetwork] = None

    # ------------------------------------------------------------------ what is adapted
    def network(self) -> nn.Module:
        """Backbone and head as one module ``(B, 3, H, W) -> (B, ways)`` (shares their parameters)."""
        return nn.Sequential(self.backbone, self.head)

    def adapted_parameters(self) -> List[nn.Parameter]:
        """The parameters the inner loop updates (all of :meth:`network` by default)."""
        return list(self.network().parameters())

    def check_ready(self) -> None:
        """Refuse to adapt before the method is set up (a subclass with a setup step overrides it; no-op here)."""

    # ------------------------------------------------------------------ inner loop
    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int, track_higher_grads: bool
    ) -> Tuple[nn.Module, List[torch.Tensor]]:
        """Inner loop: ``steps`` SGD steps of the support cross-entropy over :meth:`adapted_parameters`.

        Args:
            support_x: ``(S, 3, H, W)`` images.
            support_y: ``(S,)`` labels in ``0..ways-1``.
            steps: number of SGD steps.
            track_higher_grads: make the fast weights differentiable w.r.t. the initial weights
                (meta-training: through the steps, or by the identity with ``first_order``) or not (test).
                Gradients are enabled inside, so this also works under ``torch.no_grad()``.

        Returns:
            The patched network and its fast weights, in ``network().parameters()`` order;
            ``fnet(x, params=fast)`` -> ``(B, self.ways)``.
        """
        self.check_ready()
        ways = check_head_ways(self.display_name(), self.ways, self.num_ways(support_y))
        shots = max(1, len(support_y) // ways)
        return sgd_inner_loop(
            self.network(), self.adapted_parameters(), self.inner_lr, steps,
            lambda fnet: episode_cross_entropy(fnet(support_x)[:, :ways], support_y, shots, self.loss_reduction),
            differentiable=track_higher_grads, first_order=self.first_order,
        )  # fmt: skip

    def adapted_network(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int, differentiable: bool
    ) -> AdaptedNetwork:
        """The network adapted to a support set (``(S, 3, H, W)``, ``(S,)``), as :meth:`fit_support` keeps it.

        Override to replace the inner loop; ``differentiable`` is ``False`` at test, ``True`` in :meth:`loss`.
        """
        fnet, fast = self.adapt(support_x, support_y, steps, track_higher_grads=differentiable)
        return AdaptedNetwork(fnet, fast, self.num_ways(support_y))

    # ------------------------------------------------------------------ the two calls
    def fit_support(self, support_x: torch.Tensor, support_y: torch.Tensor) -> None:
        """Adapt fast copies of the weights (never the initial ones) with ``inner_steps_test`` steps;
        works under ``torch.no_grad()``."""
        self._adapted = self.adapted_network(support_x, support_y, self.inner_steps_test, differentiable=False)

    def forward(self, query_x: torch.Tensor) -> torch.Tensor:
        """``(Q, 3, H, W)`` -> logits ``(Q, ways)`` with the adapted weights."""
        if self._adapted is None:
            raise RuntimeError(f"{self.display_name()}: call fit_support before forward")
        return self._adapted.logits(query_x)

    def loss(self, support_x, support_y, query_x, query_y) -> torch.Tensor:
        """Query cross-entropy after the differentiable inner loop (``inner_steps``): the meta-gradient
        flows to the initial weights. The episode's graph is not kept after the call."""
        adapted = self.adapted_network(support_x, support_y, self.inner_steps, differentiable=True)
        shots = max(1, len(support_y) // adapted.ways)
        return episode_cross_entropy(adapted.logits(query_x), query_y, shots, self.loss_reduction)

    # ------------------------------------------------------------------ batched evaluation
    def supports_batched_evaluation(self) -> bool:
        """Whether the batched test-time adaptation (:meth:`evaluate_episodes`) computes what ``fit_support`` /
        ``forward`` do: only while the class keeps this class's inner loop and episode calls (a subclass that
        replaces :meth:`adapted_network`, :meth:`adapt`, ``fit_support`` or ``forward``, such as learn2learn's
        Meta-SGD, stays on the per-episode path) and steps with ``inner_lr``; and where batching pays
        (:func:`batching_pays`: not on a CPU unless :attr:`batched_on_cpu`)."""
        cls = type(self)
        own = all(getattr(cls, name) is getattr(GradientAdaptedMethod, name)
                  for name in ("adapted_network", "adapt", "fit_support", "forward"))
        return own and self.inner_lr is not None and batching_pays(self, self.batched_on_cpu)

    def episode_bytes(self, support: int, queries: int, image_size: int) -> int:
        """The default (3x the activations of the episode's images) plus three copies of the adapted weights
        (fast weights, their gradients, the next step's)."""
        adapted = sum(p.numel() * p.element_size() for p in self.adapted_parameters())
        return super().episode_bytes(support, queries, image_size) + 3 * adapted

    def evaluate_episodes(self, support_x, support_y, query_x, seeds, ways) -> torch.Tensor:
        """``E`` episodes' test-time adaptations side by side (:func:`batched_sgd_adaptation`): from the initial
        weights, ``inner_steps_test`` SGD steps of ``inner_lr`` on each support loss over
        :meth:`adapted_parameters`, then the queries with each episode's fast weights. No random draws (the
        seeds are not used). ``(E, S, 3, H, W)``, ``(E, S)``, ``(E, Q, 3, H, W)`` -> ``(E, Q, ways)``.
        Falls back to the per-episode loop where :meth:`supports_batched_evaluation` is ``False``."""
        if not self.supports_batched_evaluation():
            return self.evaluate_one_by_one(support_x, support_y, query_x, seeds, ways)
        self.check_ready()
        check_head_ways(self.display_name(), self.ways, ways)
        net = self.network()
        ids = {id(p) for p in self.adapted_parameters()}
        adapted = [n for n, p in net.named_parameters() if id(p) in ids]
        return batched_sgd_adaptation(net, adapted, self.inner_lr, self.inner_steps_test, support_x, support_y,
                                      query_x, ways, self.loss_reduction)

    def clip_gradients(self) -> None:
        """Clip every meta-gradient element to ``[-grad_clip_value, grad_clip_value]`` (cbfinn/maml ``maml.py``:
        ``tf.clip_by_value(grad, -10, 10)`` for Mini-ImageNet), when set."""
        if self.grad_clip_value is not None:
            torch.nn.utils.clip_grad_value_([p for p in self.parameters() if p.grad is not None], self.grad_clip_value)
