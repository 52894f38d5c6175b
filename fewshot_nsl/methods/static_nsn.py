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

Many episodes at once (:meth:`StaticNSN.evaluate_episodes`, issue 29): every episode's ``M_s`` stacked ``(E, ...)``
per layer and its head ``(E, ways, D)``, trained side by side through one network forward with per-episode
similarities (:mod:`fewshot_nsl.methods.batched_convnet`: the frozen ``W`` and BN shared, ``M_s`` applied per
episode), each episode's random draws replayed (:func:`~fewshot_nsl.methods.batched.replay_draws`). CNN-4 and
CNN-9 with plain convs; any other backbone, and evaluation under autocast, take the per-episode path.
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
from .batched import (
    batching_pays,
    episode_cross_entropy_sum,
    fit_linear_heads,
    linear_init,
    linear_logits,
    make_batched_optimizer,
    memory_budget,
    replay_draws,
    support_orders,
    take,
    train_batched,
)
from .batched_convnet import activation_elements, conv_steps, episode_forward, input_patches, plan_backbone
from .head_training import OPTIMIZERS, fit_linear_head, make_optimizer, train_on_support, weights_dtype

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
        # the head in the weights' dtype (the M_s are in the convs' own), not in autocast's bf16/fp16
        head = nn.Linear(self.feature_dim, ways).to(support_x.device, weights_dtype(self.backbone))
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

    # ------------------------------------------------------------------ many episodes at once
    #: Batch episodes on a CPU too (off by default: measured on the 2-core CPU in the quick grid, 2 threads, the
    #: batched 5-shot evaluation took 1.43x the per-episode one (1-shot 0.79x): the per-episode steps are already
    #: compute-bound there, :func:`~fewshot_nsl.methods.batched.batching_pays`). The equivalence tests set it.
    batched_on_cpu: bool = False

    def supports_batched_evaluation(self) -> bool:
        """True for a plain CNN-4 / CNN-9 backbone (:func:`~fewshot_nsl.methods.batched_convnet.plan_backbone`) where
        batching pays: on accelerators, not on a CPU unless :attr:`batched_on_cpu`."""
        return plan_backbone(self.backbone) is not None and batching_pays(self, self.batched_on_cpu)

    def episode_bytes(self, support: int, queries: int, image_size: int) -> int:
        """An episode's images and features, twice (the training working set is bounded per chunk of episodes,
        :meth:`_chunk_episodes`, within half the memory budget)."""
        image = 3 * image_size * image_size * 4
        return 2 * (support + queries) * (image + 4 * self.feature_dim)

    def _chunk_episodes(self, steps, images_per_episode: int, image_size: int, device: torch.device) -> int:
        """Episodes per training chunk: a step over ``images_per_episode`` images of each keeps its activations (and
        what autograd saves, about three times the layer outputs) within half of
        :func:`~fewshot_nsl.methods.batched.memory_budget`."""
        per_image = 3 * 8 * activation_elements(steps, image_size)
        return max(1, int(memory_budget(device) // 2 // max(1, per_image * images_per_episode)))

    def _replay_wrap_draws(self) -> None:
        """The draws of :func:`~fewshot_nsl.nn.wrap_convs_static` on a copy of the backbone: each wrapped conv's
        :class:`~fewshot_nsl.nn.NSConv2d` is built (initialising a weight it then drops), in wrapping order."""
        for conv in self.backbone.modules():
            if isinstance(conv, nn.Conv2d):
                NSConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,  # type: ignore[arg-type]
                         conv.bias is not None, conv.dilation, structure=self.structure)  # type: ignore[arg-type]

    def _identity_sims(self, steps, episodes: int, like: torch.Tensor) -> List[torch.Tensor]:
        """``M_s = I`` of every conv for ``episodes`` episodes: ``(E, kk)`` (DNS) or ``(E, kk, kk)`` (UNS)."""
        out = []
        for st in conv_steps(steps):
            eye = like.new_ones(st.kk) if self.structure == "dns" else torch.eye(st.kk, dtype=like.dtype, device=like.device)
            out.append(eye.expand(episodes, *eye.shape).clone())
        return out

    def _similarity_penalty(self, sims: List[torch.Tensor]) -> torch.Tensor:
        """Sum over episodes of ``similarity_regularization`` (L2, centred or not) of each episode's ``M_s``."""
        total = sims[0].new_zeros(())
        for m in sims:
            target = m
            if self.similarity_l2_centered:
                eye = m.new_ones(m.shape[1:]) if m.dim() == 2 else torch.eye(m.shape[1], dtype=m.dtype, device=m.device)
                target = m - eye
            total = total + 0.5 * target.pow(2).sum()
        return self.similarity_l2 * total

    def evaluate_episodes(self, support_x, support_y, query_x, seeds, ways) -> torch.Tensor:
        """``E`` episodes side by side: each episode's draws replayed (the wrapped convs' initialisation, the head,
        the warm-up and joint support orders), the optional head warm-up on the ``M_s = I`` features of all
        episodes (:func:`~fewshot_nsl.methods.batched.fit_linear_heads`), then the joint ``M_s`` + head steps
        (:class:`~fewshot_nsl.methods.batched.BatchedSGD` / ``BatchedAdam``, two parameter groups as
        ``fit_support``) in chunks of episodes, and the queries through each episode's network (folding does not
        change the logits). ``(E, S, 3, H, W)``, ``(E, S)``, ``(E, Q, 3, H, W)`` -> ``(E, Q, ways)``."""
        steps = plan_backbone(self.backbone)
        device = support_x.device
        if steps is None or torch.is_autocast_enabled(device.type):
            return self.evaluate_one_by_one(support_x, support_y, query_x, seeds, ways)
        n_ep, n = support_y.shape
        dtype = weights_dtype(self.backbone)

        def draw():
            self._replay_wrap_draws()
            weight, bias = linear_init(self.feature_dim, ways, device, dtype)
            warm = support_orders(n, self.head_warmup_epochs, self.batch_size, device)
            return weight, bias, warm, support_orders(n, self.epochs, self.batch_size, device)

        weight, bias, warm_orders, orders = replay_draws(seeds, device, draw)
        step_images = n if not self.batch_size or self.batch_size <= 0 else min(self.batch_size, n)
        size = support_x.shape[-1]
        chunk = self._chunk_episodes(steps, step_images, size, device)
        frozen = 2 * self._chunk_episodes(steps, max(n, query_x.shape[1]), size, device)

        def features(x: torch.Tensor, sims: List[torch.Tensor], lo: int, hi: int) -> torch.Tensor:
            return episode_forward(steps, x[lo:hi], [m[lo:hi] for m in sims])

        if self.head_warmup_epochs > 0:
            ident = self._identity_sims(steps, n_ep, support_x)
            feats = torch.cat([features(support_x, ident, lo, lo + frozen) for lo in range(0, n_ep, frozen)])
            weight, bias = fit_linear_heads(
                weight, bias, feats, support_y, warm_orders, batch_size=self.batch_size, lr=self.lr,
                momentum=self.momentum, dampening=self.dampening, weight_decay=self.weight_decay,
                optimizer=self.optimizer,
            )  # fmt: skip

        logits = []
        for lo in range(0, n_ep, chunk):
            hi = min(n_ep, lo + chunk)
            sims = [m.requires_grad_(True) for m in self._identity_sims(steps, hi - lo, support_x)]
            w = weight[lo:hi].clone().requires_grad_(True)
            b = bias[lo:hi].clone().requires_grad_(True)
            opt = make_batched_optimizer(
                self.optimizer,
                [{"params": sims, "lr": self.similarity_lr, "weight_decay": 0.0},
                 {"params": [w, b], "lr": self.lr, "weight_decay": self.weight_decay}],
                self.lr, self.momentum, self.dampening,
            )  # fmt: skip
            sx, sy = support_x[lo:hi], support_y[lo:hi]
            patches = input_patches(steps, sx)  # the first conv's patches, gathered per step

            def loss_fn(idx: torch.Tensor) -> torch.Tensor:
                x = take(sx, idx)
                feats = episode_forward(steps, x, sims, None if patches is None else take(patches, idx))
                loss = episode_cross_entropy_sum(linear_logits(w, b, feats), take(sy, idx))
                return loss + self._similarity_penalty(sims) if self.similarity_l2 else loss

            train_batched(loss_fn, opt, orders[lo:hi], self.batch_size)
            with torch.no_grad():
                final = [m.detach() for m in sims]
                logits.append(linear_logits(w.detach(), b.detach(), episode_forward(steps, query_x[lo:hi], final)))
        return torch.cat(logits)
