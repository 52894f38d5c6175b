"""Many test episodes at once: the tools of the batched evaluation path.

The harness evaluates a method that declares it (:meth:`FewShotMethod.supports_batched_evaluation`) on ``E``
episodes per call of :meth:`FewShotMethod.evaluate_episodes` instead of ``E`` calls of ``fit_support`` /
``forward``. What a method fits per episode (a linear head, the ``M_s`` of a static NSN, MAML's fast weights)
becomes one tensor with a leading episode dimension ``E``, trained by one batched computation: the per-call
overhead of thousands of tiny optimiser steps (CPU) or kernel launches (GPU) is paid once for ``E`` episodes.

Same numbers as the per-episode path. Every episode keeps its own random stream: the harness seeds the torch
RNG with the episode's seed before ``fit_support`` (:func:`seed_torch`), and a batched method replays, per
episode and in the same order, every draw ``fit_support`` makes (:func:`replay_draws`: a new head's
initialisation, then the permutations of the support set that :func:`~fewshot_nsl.methods.head_training.train_on_support`
draws, :func:`support_orders`). The optimisers here (:class:`BatchedSGD`, :class:`BatchedAdam`) apply
``torch.optim.SGD`` / ``torch.optim.Adam``'s update rules element-wise to the stacked parameters, so an
episode's parameters follow the per-episode path's up to floating-point rounding (summing the episodes'
losses gives each episode's parameters exactly their own episode's gradient).

The stacked parameters are made in the dtype of the method's weights
(:func:`~fewshot_nsl.methods.head_training.weights_dtype`), as the per-episode path makes them, never in the
autocast dtype of the features: :func:`fit_linear_heads` casts the features to its heads' dtype, and the optimisers
keep their state in the parameters' dtype whatever the dtype of a gradient computed under autocast.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .head_training import drop_stale_casts

#: What :func:`auto_batch_episodes` keeps an evaluation batch under (bytes; a quarter of the free memory on CUDA).
CPU_EVAL_BUDGET_BYTES = 2 * 1024**3
#: Most episodes per batch (past this the per-call overhead is already amortised; a killed run loses at most this many).
MAX_BATCH_EPISODES = 100
#: Images per backbone call when a batched method extracts features of many episodes on a GPU (bounds activation
#: memory; larger calls launch fewer kernels).
FEATURE_CHUNK_IMAGES = 1024
#: The same on a CPU: memory-bound layers (pooling, BN) slow down once a call's activations leave the caches; at 42 px
#: on a 2-core CPU 64 images per call measured faster per image than 256 (and than one call per episode).
CPU_FEATURE_CHUNK_IMAGES = 64


def episode_seed(seed: int, episode: int) -> int:
    """The seed of episode ``episode`` of an evaluation with seed ``seed`` (the per-episode random stream)."""
    return (seed * 1_000_003 + episode) % (2**63 - 1)


def seed_torch(seed: int, device: torch.device) -> None:
    """``torch.manual_seed(seed)``, without its cost where CUDA is not in use.

    ``torch.manual_seed`` also queues a lazy seeding of CUDA, which records a stack trace
    (~2 ms, a tenth of a 32x32 ProtoNet episode on a 2-core CPU); on a CPU device with CUDA
    not initialised, seeding the CPU generator is the same thing for the method.
    """
    if torch.device(device).type == "cpu" and not torch.cuda.is_initialized():
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def replay_draws(seeds: Sequence[int], device: torch.device, draw: Callable[[], Tuple[torch.Tensor, ...]]
                 ) -> Tuple[torch.Tensor, ...]:
    """Run ``draw`` once per episode after seeding the torch RNG with its seed, and stack what it returns.

    Args:
        seeds: the episodes' seeds (:func:`episode_seed`), ``E`` of them.
        device: the evaluation device (what :func:`seed_torch` seeds).
        draw: makes, in the per-episode path's order, every random draw of one episode's ``fit_support`` and
            returns the tensors drawn (e.g. a head's weight and bias, the support orders).

    Returns:
        Each returned tensor stacked over the episodes: ``(E, *shape)``.
    """
    per_episode: List[Tuple[torch.Tensor, ...]] = []
    for s in seeds:
        seed_torch(int(s), device)
        per_episode.append(tuple(draw()))
    return tuple(torch.stack(parts) for parts in zip(*per_episode))


def linear_init(in_features: int, out_features: int, device: torch.device, dtype: torch.dtype
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The draws of ``nn.Linear(in_features, out_features).to(device, dtype)``: weight ``(out, in)``, bias ``(out,)``
    (made on the CPU generator as ``nn.Linear`` makes them, then moved). ``dtype`` is the method's weights' dtype
    (:func:`~fewshot_nsl.methods.head_training.weights_dtype`), not the features'."""
    layer = torch.nn.Linear(in_features, out_features)
    return layer.weight.detach().to(device, dtype), layer.bias.detach().to(device, dtype)


def support_orders(n: int, epochs: int, batch_size: Optional[int], device: torch.device,
                   shuffle_full_batch: bool = False) -> torch.Tensor:
    """The support orders :func:`~fewshot_nsl.methods.head_training.train_on_support` uses, drawn as it draws them.

    Returns:
        ``(epochs, n)`` int64: a permutation per pass when the passes are shuffled (``batch_size < n`` or
        ``shuffle_full_batch``), else ``0..n-1`` (no draw).
    """
    bs = n if not batch_size or batch_size <= 0 else min(batch_size, n)
    if epochs <= 0:
        return torch.zeros(0, n, dtype=torch.long, device=device)
    if bs < n or shuffle_full_batch:
        return torch.stack([torch.randperm(n, device=device) for _ in range(epochs)])
    return torch.arange(n, device=device).expand(epochs, n)


def batch_slices(n: int, batch_size: Optional[int]) -> List[slice]:
    """The mini-batches of one pass over ``n`` support items (as :func:`train_on_support` cuts them)."""
    bs = n if not batch_size or batch_size <= 0 else min(batch_size, n)
    return [slice(start, start + bs) for start in range(0, n, bs)]


def take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-episode rows: ``(E, N, *F)``, ``(E, b)`` indices -> ``(E, b, *F)``."""
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    return x[rows, idx]


# ----------------------------------------------------------------------------- optimisers
class _BatchedOptimizer:
    """Base of the batched optimisers: ``groups`` of stacked parameters ``(E, *shape)``, each group a dict with
    ``params`` (list of tensors) and optionally ``lr`` / ``weight_decay``, as ``torch.optim`` groups."""

    def __init__(self, groups: Sequence[Dict], lr: float) -> None:
        self.groups = [dict(g) for g in groups]
        for g in self.groups:
            g["params"] = list(g["params"])
            g.setdefault("lr", lr)
            g.setdefault("weight_decay", 0.0)
        self.state: Dict[int, Dict[str, torch.Tensor]] = {}

    @property
    def params(self) -> List[torch.Tensor]:
        return [p for g in self.groups for p in g["params"]]

    def step(self, grads: Sequence[Optional[torch.Tensor]]) -> None:
        """Update every parameter in place (no autograd) from ``grads``, in :attr:`params` order. A gradient is
        cast to its parameter's dtype first (one computed under autocast may be bf16/fp16), so the update and the
        optimiser state are in the parameter's dtype, as ``torch.optim`` keeps them."""
        it = iter(grads)
        with torch.no_grad():
            for g in self.groups:
                for p in g["params"]:
                    grad = next(it)
                    if grad is not None:
                        self._update(p, grad.to(p.dtype), g)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: Dict) -> None:
        raise NotImplementedError


class BatchedSGD(_BatchedOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, weight decay; not Nesterov) on stacked parameters.

    The first step copies the gradient into the momentum buffer (no dampening), as ``torch.optim.SGD`` does.
    """

    def __init__(self, groups: Sequence[Dict], lr: float, momentum: float = 0.0, dampening: float = 0.0) -> None:
        super().__init__(groups, lr)
        self.momentum, self.dampening = momentum, dampening

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: Dict) -> None:
        d_p = grad if not group["weight_decay"] else grad.add(p, alpha=group["weight_decay"])
        if self.momentum:
            state = self.state.setdefault(id(p), {})
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d_p.detach().clone()
            else:
                buf.mul_(self.momentum).add_(d_p, alpha=1 - self.dampening)
            d_p = buf
        p.add_(d_p, alpha=-group["lr"])


class BatchedAdam(_BatchedOptimizer):
    """``torch.optim.Adam`` (betas 0.9 / 0.999, eps 1e-8, L2 weight decay, no AMSGrad) on stacked parameters."""

    def __init__(self, groups: Sequence[Dict], lr: float, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        super().__init__(groups, lr)
        self.betas, self.eps = betas, eps

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: Dict) -> None:
        beta1, beta2 = self.betas
        if group["weight_decay"]:
            grad = grad.add(p, alpha=group["weight_decay"])
        state = self.state.setdefault(id(p), {})
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = group["lr"] / (1 - beta1**t)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(self.eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)


def make_batched_optimizer(name: str, groups: Sequence[Dict], lr: float, momentum: float = 0.9,
                           dampening: float = 0.0) -> _BatchedOptimizer:
    """The batched twin of :func:`~fewshot_nsl.methods.head_training.make_optimizer`: ``"sgd"`` or ``"adam"``."""
    if name == "sgd":
        return BatchedSGD(groups, lr, momentum, dampening)
    if name == "adam":
        return BatchedAdam(groups, lr)
    raise ConfigError(f"optimizer must be one of sgd, adam, got {name!r}")


def train_batched(loss_fn: Callable[[torch.Tensor], torch.Tensor], opt: _BatchedOptimizer, orders: torch.Tensor,
                  batch_size: Optional[int]) -> None:
    """The batched twin of :func:`~fewshot_nsl.methods.head_training.train_on_support`.

    Args:
        loss_fn: maps the support indices of a step, ``(E, b)``, to the SUM over the episodes of each episode's
            loss (so each episode's parameters get its own episode's gradient).
        opt: batched optimiser over stacked parameters ``(E, *shape)``.
        orders: ``(E, epochs, n)`` support orders (:func:`support_orders` per episode).
        batch_size: items per step; ``None`` (or ``<= 0``) for full-batch steps.
    """
    params = opt.params
    n = orders.shape[-1]
    with torch.enable_grad():
        drop_stale_casts()
        for epoch in range(orders.shape[1]):
            order = orders[:, epoch]
            for sl in batch_slices(n, batch_size):
                loss = loss_fn(order[:, sl])
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                opt.step(grads)
                drop_stale_casts()  # the stacked parameters changed in place: autocast's copies of them are stale


def linear_logits(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-episode linear heads: weight ``(E, ways, D)``, bias ``(E, ways)``, features ``(E, b, D)`` -> ``(E, b, ways)``."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def episode_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over episodes of each episode's mean cross-entropy: ``(E, b, ways)``, ``(E, b)`` -> scalar."""
    e, b, ways = logits.shape
    return F.cross_entropy(logits.reshape(e * b, ways), labels.reshape(e * b), reduction="sum") / b


def fit_linear_heads(
    weight: torch.Tensor,
    bias: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    orders: torch.Tensor,
    *,
    batch_size: Optional[int],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    optimizer: str = "sgd",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The batched twin of :func:`~fewshot_nsl.methods.head_training.fit_linear_head`: ``E`` linear heads trained
    by cross-entropy on their episodes' frozen support features, side by side.

    Args:
        weight: ``(E, ways, D)`` initial weights (:func:`linear_init` per episode), in the method's weights' dtype.
        bias: ``(E, ways)`` initial biases.
        features: ``(E, S, D)`` support features, cast to ``weight``'s dtype (bf16/fp16 features under autocast
            train float32 heads, as :func:`~fewshot_nsl.methods.head_training.fit_linear_head` does).
        labels: ``(E, S)`` int64 labels in ``0..ways-1``.
        orders: ``(E, epochs, S)`` support orders (:func:`support_orders` per episode).
        batch_size, lr, momentum, dampening, weight_decay, optimizer: as ``fit_linear_head``.

    Returns:
        The trained ``(weight, bias)`` (new tensors, no grad).
    """
    w, b = weight.detach().clone(), bias.detach().clone()
    opt = make_batched_optimizer(optimizer, [{"params": [w, b], "weight_decay": weight_decay}], lr, momentum, dampening)
    features = features.detach().to(w.dtype)
    targets = F.one_hot(labels, w.shape[1]).to(w.dtype)  # (E, S, ways)
    slices = batch_slices(features.shape[1], batch_size)
    # The gradient of the mean cross-entropy of a linear layer, written out: (softmax - onehot) / b back through
    # the layer (what autograd computes, without its per-call bookkeeping: ~700 steps per episode).
    with torch.no_grad():
        for epoch in range(orders.shape[1]):
            order = orders[:, epoch]  # (E, S): one gather per pass, the mini-batches are views of it
            x_pass, y_pass = take(features, order), take(targets, order)
            for sl in slices:
                x, y = x_pass[:, sl], y_pass[:, sl]
                # the logits in the heads' dtype (autocast gives bf16/fp16): the loss's softmax in full precision,
                # as cross-entropy runs under autocast on the per-episode path
                g = torch.softmax(linear_logits(w, b, x).to(w.dtype), dim=-1).sub_(y).div_(x.shape[1])  # (E, b, ways)
                opt.step([torch.bmm(g.transpose(1, 2), x), g.sum(1)])
    return w, b


# ----------------------------------------------------------------------------- where batching pays
def batching_pays(module: torch.nn.Module, on_cpu: bool = False) -> bool:
    """Whether training a conv network per episode pays to batch over episodes on ``module``'s device.

    On a CPU these per-episode steps are compute-bound (convolution, batch norm and max-pool over the support
    images; the per-call overhead batching saves is a few percent), and the batched computation (grouped convs,
    vmap's layout changes) is slower: measured on the 2-core CPU, 1 thread, CNN-4 at 42 px, batched / per-episode
    time 1.24 (MAML 5-shot, 10 steps, E=20), 0.79 (MAML 1-shot), 1.46 (meta_static_nsn 5-shot, E=10), 2.4
    (finetune of the whole 64-filter network, 15 steps, E=10). So it is used on accelerators (kernel-launch
    bound), and on a CPU only when asked (``on_cpu``, the equivalence tests).
    """
    param = next(module.parameters(), None)
    return on_cpu or (param is not None and param.device.type != "cpu")


# ----------------------------------------------------------------------------- features and memory
def feature_chunk_images(device: torch.device) -> int:
    """Images per backbone call for features of many episodes: :data:`CPU_FEATURE_CHUNK_IMAGES` on a CPU,
    :data:`FEATURE_CHUNK_IMAGES` elsewhere."""
    return CPU_FEATURE_CHUNK_IMAGES if torch.device(device).type == "cpu" else FEATURE_CHUNK_IMAGES


def in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: Optional[int] = None
              ) -> torch.Tensor:
    """``fn`` over ``x`` ``(N, ...)`` in chunks of ``chunk`` rows (default :func:`feature_chunk_images`),
    concatenated (bounds the activation memory).

    Only for functions that treat rows independently (a backbone in eval mode with running BN statistics).
    """
    chunk = chunk or feature_chunk_images(x.device)
    if len(x) <= chunk:
        return fn(x)
    return torch.cat([fn(x[i:i + chunk]) for i in range(0, len(x), chunk)])


def episode_features(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     chunk: Optional[int] = None) -> torch.Tensor:
    """Features of every episode's images: ``(E, N, 3, H, W)`` -> ``(E, N, *F)``, ``fn`` over chunks of images."""
    e, n = x.shape[:2]
    out = in_chunks(fn, x.reshape(e * n, *x.shape[2:]), chunk)
    return out.reshape(e, n, *out.shape[1:])


def memory_budget(device: torch.device) -> int:
    """Bytes an evaluation batch may use: a quarter of the free memory on CUDA, :data:`CPU_EVAL_BUDGET_BYTES` elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 4)
    return CPU_EVAL_BUDGET_BYTES


def auto_batch_episodes(episode_bytes: int, device: torch.device, n_episodes: int) -> int:
    """Episodes per batch: as many as fit :func:`memory_budget` at ``episode_bytes`` each, between 1 and
    :data:`MAX_BATCH_EPISODES` (and no more than ``n_episodes``)."""
    fit = memory_budget(device) // max(1, int(episode_bytes))
    return int(max(1, min(MAX_BATCH_EPISODES, fit, max(1, n_episodes))))


def activation_bytes_per_image(module: torch.nn.Module, image_size: int) -> int:
    """Bytes of every leaf module's output for one ``(1, 3, image_size, image_size)`` float32 image (one forward
    in eval mode under ``no_grad`` with hooks; the module's mode is restored)."""
    total = [0]

    def hook(_mod, _inp, out) -> None:
        if isinstance(out, torch.Tensor):
            total[0] += out.numel() * out.element_size()

    leaves = [m for m in module.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = module.training
    try:
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
        module.eval()
        with torch.no_grad():
            module(torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return max(total[0], 3 * image_size * image_size * 4)
