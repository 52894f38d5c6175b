"""Training on an episode's support set: the optimisers, the mini-batch loop and a linear head on frozen features.

Used by every method that fits something to the support set by plain gradient steps (no meta-learning):
``static_nsn`` (``M_s`` and a new head), ``dynamic_nsn`` (a new head on the frozen dynamic NSN), and the
``finetune`` baseline (a new head, optionally with a copy of the backbone). Their defaults follow the
finetuning protocol of Chen et al. (ICLR 2019, ``baselinefinetune.py``): SGD lr 0.01, momentum 0.9,
dampening 0.9, weight decay 1e-3, batch 4, 100 passes over the support set.

What is trained per episode (a new head, the ``M_s``) is made in the dtype of the method's weights
(:func:`weights_dtype`: float32, float64 in the equivalence tests) and trained on features cast to it: under
``--precision bf16|fp16`` the backbone returns bf16/fp16 features, and a head made in their dtype would keep its
weights and its optimiser state in bf16/fp16, where ``lr * grad`` falls below one rounding step (most weights
never move). Autocast still runs the head's matmuls in low precision (:mod:`fewshot_nsl.precision`), from copies
of the weights made afresh after every optimiser step (:func:`drop_stale_casts`).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

OPTIMIZERS = ("sgd", "adam")


def weights_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s floating-point parameters (float32 when it has none): the dtype a method makes
    and trains its per-episode parameters in, never the autocast dtype of the features ``module`` returns."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def drop_stale_casts() -> None:
    """Forget autocast's low-precision copies of float32 leaves that require grad (the weights being trained).

    Autocast casts such a leaf once and reuses the copy until its outermost region ends; an optimiser step updates
    the leaf in place, which does not invalidate the copy. The harness's autocast region covers a whole
    ``fit_support`` (and a batch of episodes), so without this every forward of a support-set training loop would
    run with the weights of its first step. Called before the first step and after every step (a no-op without
    autocast; the next forward casts the weights again, as once per step in a training loop's own region).
    """
    torch.clear_autocast_cache()


def make_optimizer(
    name: str, groups: Sequence[Dict], lr: float, momentum: float = 0.9, dampening: float = 0.0
) -> torch.optim.Optimizer:
    """``"sgd"`` (with momentum/dampening) or ``"adam"`` over parameter ``groups`` (each may set ``lr``/``weight_decay``)."""
    if name == "sgd":
        return torch.optim.SGD(list(groups), lr=lr, momentum=momentum, dampening=dampening)
    if name == "adam":
        return torch.optim.Adam(list(groups), lr=lr)
    raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def train_on_support(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    opt: torch.optim.Optimizer,
    epochs: int,
    batch_size: Optional[int],
    device: torch.device,
    shuffle_full_batch: bool = False,
) -> None:
    """Mini-batch training on a support set of ``n`` items, gradients enabled (works under ``no_grad``).

    Args:
        loss_fn: maps a batch of support indices ``(b,)`` to a scalar loss.
        n: support-set size.
        opt: optimiser over the parameters being adapted.
        epochs: passes over the support set (shuffled with the global torch RNG, which the
            evaluation harness re-seeds before every episode).
        batch_size: items per step; ``None`` (or ``<= 0``) for full-batch steps.
        device: where the indices live.
        shuffle_full_batch: draw a permutation every pass also when one batch holds the whole support
            set (the ``finetune`` baseline's loop; it only reorders the batch, but uses the RNG).
    """
    bs = n if not batch_size or batch_size <= 0 else min(batch_size, n)
    with torch.enable_grad():
        drop_stale_casts()  # copies cached by a forward before the training (e.g. a warm-up's last step)
        for _ in range(epochs):
            shuffle = bs < n or shuffle_full_batch
            order = torch.randperm(n, device=device) if shuffle else torch.arange(n, device=device)
            for start in range(0, n, bs):
                loss = loss_fn(order[start : start + bs])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                drop_stale_casts()  # the weights changed in place: autocast's copies of them are stale


def fit_linear_head(
    head: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: Optional[int],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    optimizer: str = "sgd",
    shuffle_full_batch: bool = False,
) -> nn.Module:
    """Train ``head`` by cross-entropy on fixed (frozen-backbone) support features, in place.

    Args:
        head: the classifier, ``(b, D) -> (b, ways)`` (a new ``nn.Linear`` in every caller).
        features: ``(S, D)`` support features, computed once (no graph); cast to the dtype of ``head``'s weights
            (bf16/fp16 features under autocast train a float32 head).
        labels: ``(S,)`` labels in ``0..ways-1``.
        epochs: passes over the support set.
        batch_size: items per step; ``None`` (or ``<= 0``) for full-batch steps.
        lr: learning rate.
        momentum: SGD momentum.
        dampening: SGD dampening.
        weight_decay: weight decay of the head.
        optimizer: ``"sgd"`` or ``"adam"`` (:func:`make_optimizer`).
        shuffle_full_batch: see :func:`train_on_support`.

    Returns:
        ``head``.
    """
    features = features.to(weights_dtype(head))
    opt = make_optimizer(
        optimizer, [{"params": list(head.parameters()), "weight_decay": weight_decay}], lr, momentum, dampening
    )
    train_on_support(
        lambda idx: F.cross_entropy(head(features[idx]), labels[idx]),
        len(labels), opt, epochs, batch_size, features.device, shuffle_full_batch,
    )  # fmt: skip
    return head
