"""Base-class pretraining and episodic meta-training loops, with checkpoints.

* :func:`pretrain` trains ``method.pretrain_module()`` plus a linear head with cross-entropy
  on every image of the base (``train``) classes. The weights are cached under
  ``<cache>/pretrain/<key>.pt`` where ``key`` hashes everything that determines them (dataset
  fingerprint, image size, backbone and conv config, pretraining hyperparameters, seed), so
  every method with the same backbone config reuses one pretraining.
* :func:`meta_train` runs episodic training on base-class episodes sampled on the fly from a
  seeded generator, checkpointing so an interrupted run resumes.

Devices, seeds, checkpoint loading and the pretraining cache key are in :mod:`fewshot_nsl.training_state`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data.episodes import Episode, EpisodeSampler, Materialiser
from .data.prefetch import Prefetcher, stages
from .data.store import ImageStore, default_cache_dir
from .errors import ConfigError, FewShotError, MethodError
from .config import RunConfig
from .console import RunStatus
from .curves import LogitsProbe, StageCurve
from .methods.base import FewShotMethod
from .evaluation import _method_error, run_episode
from .precision import autocast, grad_scaler
from .validation import StageValidator, ValidationSettings, prototype_logits
from .training_state import (  # noqa: F401  (re-exported: callers import them from training)
    cached_world_size,
    check_finite,
    nonfinite_error,
    host_rng_states,
    load_checkpoint,
    pretrain_cache_path,
    pretrain_key,
    resolve_device,
    set_host_rng_states,
    set_seed,
)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file, then rename, so a kill never leaves half a checkpoint."""
    from .safe_io import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


# ----------------------------------------------------------------------------- pretraining
@dataclass
class _Augmentation:
    """One batch's random crop and brightness/contrast jitter, drawn by :func:`_draw_augmentation`.

    Attributes:
        top, left, height, width: the crop (of an ``image_size`` square), resized back to the full size.
        scale, shift: ``(b, 1, 1, 1)`` per-image factors and offsets on the host (pinned for a CUDA device).
    """

    top: int
    left: int
    height: int
    width: int
    scale: torch.Tensor
    shift: torch.Tensor


def _draw_augmentation(
    gen: torch.Generator, size: int, b: int, part: Optional[slice] = None, total: Optional[int] = None
) -> _Augmentation:
    """Draw the random crop (scale 0.8-1) and the brightness/contrast jitter of a batch of ``b`` images
    of ``size x size`` from ``gen`` (the only random numbers of a pretraining batch, in this order).

    For data-parallel pretraining the batch holds the images ``part`` of a global batch of ``total``
    images: the per-image jitter is drawn for the whole batch and sliced, so every process draws
    the same random numbers and the result equals single-process augmentation of the full batch.
    """
    n, part = (total or b), (part or slice(None))
    s = float(torch.empty(1).uniform_(0.8, 1.0, generator=gen))
    ch, cw = max(1, int(size * s)), max(1, int(size * s))
    i = int(torch.randint(0, size - ch + 1, (1,), generator=gen))
    j = int(torch.randint(0, size - cw + 1, (1,), generator=gen))
    scale = torch.empty(n, 1, 1, 1).uniform_(0.8, 1.2, generator=gen)[part]
    shift = torch.empty(n, 1, 1, 1).uniform_(-0.2, 0.2, generator=gen)[part]
    return _Augmentation(i, j, ch, cw, scale, shift)


def _augment(x: torch.Tensor, aug: _Augmentation) -> torch.Tensor:
    """Apply a drawn augmentation to ``(B, 3, H, W)`` images: crop, resize back (bilinear), ``x * scale + shift``."""
    h, w = x.shape[2], x.shape[3]
    x = x[:, :, aug.top : aug.top + aug.height, aug.left : aug.left + aug.width]
    if (aug.height, aug.width) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x * aug.scale.to(x.device, non_blocking=True) + aug.shift.to(x.device, non_blocking=True)


@dataclass
class _Batch:
    """One pretraining batch on its way through the input pipeline (:func:`_pretrain_batches`).

    Attributes:
        x: ``(b, H, W, 3)`` uint8 store images on the host after the host stage (pinned for a CUDA device);
            ``(b, 3, S, S)`` normalised and augmented float on the device after the device stage.
        y: ``(b,)`` int64 labels (host, then device).
        aug: the batch's augmentation, or None.
        n_global: images in the global batch (data-parallel pretraining: all processes together).
    """

    x: Any
    y: torch.Tensor
    aug: Optional[_Augmentation]
    n_global: int


def _pretrain_batches(
    perm: np.ndarray, index: np.ndarray, batch_size: int, budget: int, rank: int, world: int,
    gen: Optional[torch.Generator], size: int,
):
    """The work items of one pretraining epoch (at most ``budget``): ``(store indices (b,), positions of the
    images in ``index`` (b,), augmentation or None, global batch size)``.

    Augmentations are drawn from ``gen`` in batch order, in the caller's thread, as the input pipeline pulls
    each item. A ragged last batch too small to split over ``world`` processes is skipped by every process
    (drawing nothing).
    """
    for start in range(0, len(perm), batch_size):
        if budget <= 0:
            return
        batch = perm[start : start + batch_size]
        part = slice(None)
        if world > 1:
            if len(batch) < world:
                continue
            bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(len(batch)), world)])
            part = slice(int(bounds[rank]), int(bounds[rank + 1]))
        aug = None if gen is None else _draw_augmentation(gen, size, len(batch[part]), part, len(batch))
        budget -= 1
        yield index[batch[part]], batch[part], aug, len(batch)


class _PretrainNet(nn.Module):
    """``head(module(x))``: one module, so data-parallel training can wrap it."""

    def __init__(self, module: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.module, self.head = module, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.module(x))


def pretrain(
    method: FewShotMethod,
    store: ImageStore,
    cfg: RunConfig,
    device: torch.device,
    conv_spec: Dict[str, Any],
    cache_dir: Optional[Path] = None,
    progress: bool = True,
    distributed: bool = False,
    curve: Optional[List[Dict[str, Any]]] = None,
    compiled: bool = False,
    status: Optional[RunStatus] = None,
) -> Dict[str, Any]:
    """Train (or load from cache) ``method.pretrain_module()`` on all base classes.

    The torch RNG is forked and seeded from ``cfg.seed`` for the duration, so the weights do
    not depend on what ran before in the process, and the caller's RNG state is the same
    whether the weights were trained or loaded from the cache.

    Args:
        distributed: data-parallel over an initialised ``torch.distributed`` process group
            (see :mod:`fewshot_nsl.distributed`): every process walks the same global batches
            and trains on its contiguous slice of each; gradients are averaged by DDP with the
            loss scaled so the update equals the full-batch one. BatchNorm layers become
            SyncBatchNorm on CUDA; on CPU (gloo) their batch statistics stay per process.
        curve: when given, the training-curve rows of the pretraining (:mod:`fewshot_nsl.curves`;
            kept in the cache file, so a cache hit gives them too) are appended to it.
        compiled: train the network compiled with ``torch.compile`` (:mod:`fewshot_nsl.compiling`);
            the cache key does not depend on it.
        status: the run's :class:`~fewshot_nsl.console.RunStatus` (progress lines, where a resumed
            pretraining goes on from); None: nothing said.

    Returns:
        ``{"cache_path": str, "cached": bool, "train_accuracy": float, "world_size": int}``.
    """
    module = method.pretrain_module()
    cache_dir = Path(cache_dir or default_cache_dir())
    path = pretrain_cache_path(cfg, store, conv_spec, type(method), cache_dir)
    def from_cache() -> Dict[str, Any]:
        ckpt = load_checkpoint(path, device)
        module.load_state_dict(ckpt["module"])
        if curve is not None:
            curve.extend(ckpt.get("curve", []))
        return {"cache_path": str(path), "cached": True, "train_accuracy": ckpt["train_accuracy"],
                "world_size": int(ckpt.get("world_size", 1)),
                "trained_with": ckpt.get("trained_with") or {"fast_mode": "unknown (cached before it was recorded)"},
                **({"validation": ckpt["validation"]} if ckpt.get("validation") else {})}

    if path.is_file():
        return from_cache()
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    if distributed:  # every process must enter the training loop together: no lock
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed)
            return _pretrain(method, module, store, cfg, device, path, progress, distributed, curve, compiled, status)
    from .safe_io import locked

    # One process trains a given pretraining; others asking for it meanwhile (parallel grid runs, Ray
    # tasks on one machine) wait for the lock and then load the cache instead of training it again.
    with locked(path):
        if path.is_file():
            return from_cache()
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed)
            return _pretrain(method, module, store, cfg, device, path, progress, distributed, curve, compiled, status)


def pretrain_optimizer(params: List[nn.Parameter], p: Any, total: int) -> Tuple[torch.optim.Optimizer, Any]:
    """The optimiser and lr schedule of base-class pretraining (``cfg.pretrain``: :class:`~fewshot_nsl.config.PretrainConfig`).

    ``optimizer: sgd``: SGD with Nesterov momentum ``p.momentum``; ``optimizer: adam``: Adam with its default
    betas and eps (Ravi & Larochelle's ``optim.adam``, twitter/meta-learning-lstm
    ``model/baselines/pre-train.lua`` l. 52, 90). Both take ``p.weight_decay`` as L2 in the gradient.
    ``schedule: onecycle``: one-cycle with peak ``p.lr`` and 10% warm-up over ``total`` steps; ``constant``: ``p.lr``
    throughout (a schedule that does nothing, so checkpoints and resume look the same).

    Returns:
        ``(optimizer, scheduler)``; the scheduler is stepped once per optimiser step.
    """
    if p.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay, nesterov=True)
    if p.schedule == "constant":
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    # OneCycleLR divides by the warm-up length pct_start * total - 1 steps: ZeroDivisionError where that is 0
    # (total 10 at 0.1, e.g. one epoch of 10 batches). Nudged up, the warm-up is still its first step only.
    pct_start = 0.1
    while float(pct_start * max(total, 1)) - 1 == 0:
        pct_start = math.nextafter(pct_start, 1.0)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=max(total, 1), pct_start=pct_start)


class IntervalLog:
    """The losses (and accuracies) of a stage's steps since its last curve row, kept on the device.

    Training loops :meth:`add` 0-d device tensors every step (no host synchronisation) and :meth:`flush` them
    once per curve row (every ``curve.every`` steps), before every checkpoint and at the end: one transfer reads
    them all, checks that every loss is finite (naming the first bad one by its own description, as a per-step
    check did) and writes the curve row (the mean over the interval).

    Args:
        curve: the stage's :class:`~fewshot_nsl.curves.StageCurve`.
    """

    def __init__(self, curve: StageCurve) -> None:
        self.curve = curve
        self.losses: List[torch.Tensor] = []
        self.accs: List[Optional[torch.Tensor]] = []
        self.where: List[str] = []

    def add(self, loss: torch.Tensor, accuracy: Optional[torch.Tensor], where: str) -> None:
        """Record one loss (a 0-d tensor), its accuracy (0-d tensor in [0, 1] or None) and what it was."""
        self.losses.append(loss.detach().float().reshape(()))
        self.accs.append(None if accuracy is None else accuracy.detach().float().reshape(()))
        self.where.append(where)

    def row_due(self, step: int) -> bool:
        return step % self.curve.every == 0 or step == self.curve.total

    def flush(self, step: int) -> Optional[float]:
        """Read, check and log what was added since the last flush as the curve row of step ``step``.

        Returns:
            The mean loss of the interval (None when nothing was added).

        Raises:
            NumericalError: a loss is NaN or Inf (the first one is named).
        """
        if not self.losses:
            return None
        have_acc = all(a is not None for a in self.accs)
        values = torch.stack(self.losses + ([a for a in self.accs] if have_acc else [])).tolist()  # one sync
        losses, accs = values[: len(self.losses)], values[len(self.losses):]
        bad = next((where for v, where in zip(losses, self.where) if not math.isfinite(v)), None)
        if bad is not None:
            raise nonfinite_error(bad)
        mean = sum(losses) / len(losses)
        self.curve.update(step, mean, sum(accs) / len(accs) if have_acc else None)
        self.losses, self.accs, self.where = [], [], []
        return mean


def restore_pretraining(partial: Path, module: nn.Module, head: nn.Module, opt: torch.optim.Optimizer, sched: Any,
                        gen: torch.Generator, validator: StageValidator,
                        scaler: Optional[torch.amp.GradScaler] = None) -> Tuple[int, List[Dict[str, Any]]]:
    """Restore a pretraining from its ``.partial`` checkpoint (the state after its last finished epoch).

    The file is read on the CPU whatever the training device: the generator's and torch's RNG states must be CPU
    byte tensors (``Generator.set_state`` refuses a CUDA tensor: every preempted GPU pretraining used to fail to
    resume), while ``load_state_dict`` copies weights and optimiser state onto the device of the live modules.

    Returns:
        ``(step, curve rows)`` to continue from.
    """
    ckpt = load_checkpoint(partial, torch.device("cpu"))
    module.load_state_dict(ckpt["module"])
    head.load_state_dict(ckpt["head"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    gen.set_state(ckpt["generator"])
    torch.set_rng_state(ckpt["torch_rng"])
    validator.load_state_dict(ckpt.get("validation"))
    return int(ckpt["step"]), list(ckpt.get("curve", []))


def _pretrain(method, module, store, cfg, device, path, progress, distributed, curve=None, compiled=False,
              status=None) -> Dict[str, Any]:
    """The pretraining loop of :func:`pretrain` (cache miss)."""
    rank, world = 0, 1
    if distributed:
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg.pretrain.batch_size < world:
            raise ConfigError(f"pretrain batch_size {cfg.pretrain.batch_size} is smaller than the {world} processes")
    classes = store.classes_in_split("train")
    index = np.concatenate([store.class_members(c) for c in classes])
    remap = np.full(store.num_classes, -1, dtype=np.int64)
    remap[classes] = np.arange(len(classes))
    labels = torch.from_numpy(remap[store.labels[index]])
    mat = Materialiser(store, cfg.image_size, device)
    p = cfg.pretrain
    module.to(device).train()
    head = nn.Linear(method.backbone.feature_dim(cfg.image_size), len(classes)).to(device)
    net: nn.Module = _PretrainNet(module, head)
    sync_bn = False
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # replaces the BN layers inside `module`
            sync_bn = True
        net = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    if compiled:
        from .compiling import compile_in_place

        compile_in_place(net)  # in place: `module`'s parameter names (the cache file) are unchanged
    params = list(module.parameters()) + list(head.parameters())
    steps_per_epoch = math.ceil(len(index) / p.batch_size)
    total = steps_per_epoch * p.epochs
    if p.max_steps is not None:
        total = min(total, p.max_steps)
    opt, sched = pretrain_optimizer(params, p, total)
    scaler = grad_scaler(cfg.precision, device)
    validator = StageValidator("pretrain", ValidationSettings.of(p), cfg, store, device,
                               lambda t, i: prototype_logits(module, t), module)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, correct, seen = 0, 0, 0
    curve_rows: List[Dict[str, Any]] = []  # training-curve rows of a resumed pretraining
    # Single-process pretraining checkpoints at every epoch end to `<cache file>.partial`, so a killed run
    # resumes from its last finished epoch with the same weights an uninterrupted run would reach.
    partial = path.with_name(path.name + ".partial") if world == 1 else None
    if partial is not None and partial.is_file():
        step, curve_rows = restore_pretraining(partial, module, head, opt, sched, gen, validator, scaler)
        if status is not None:
            status.note(f"resuming pretraining from its last finished epoch: step {step} of {total} "
                        f"(epoch {step // steps_per_epoch} of {math.ceil(total / steps_per_epoch)})")
    if status is not None and rank == 0:
        status.begin("pretrain", total, step)
    stage_curve = StageCurve("pretrain", total, curve_rows)
    log = IntervalLog(stage_curve)
    bar = tqdm(total=total, initial=step, desc=f"pretrain {cfg.backbone}", disable=not progress or rank > 0, unit="step")

    def host_stage(item: Tuple[np.ndarray, np.ndarray, Optional[_Augmentation], int]) -> _Batch:
        idx, pos, aug, n_global = item
        if aug is not None and mat.pin_memory:
            aug = replace(aug, scale=aug.scale.pin_memory(), shift=aug.shift.pin_memory())
        y = labels[pos]
        return _Batch(mat.gather(idx), y.pin_memory() if mat.pin_memory else y, aug, n_global)

    def device_stage(b: _Batch) -> _Batch:
        x = mat.to_device(b.x)
        return _Batch(x if b.aug is None else _augment(x, b.aug), b.y.to(device, non_blocking=True), None, b.n_global)

    # the next batch is gathered in a background thread while this one trains (normalised and augmented here)
    prepare, finish = stages(host_stage, device_stage)
    while step < total and validator.stopped_at is None:
        perm = torch.randperm(len(index), generator=gen).numpy()
        correct, seen = torch.zeros((), device=device), 0  # this epoch's, summed on the device
        epoch = _pretrain_batches(perm, index, p.batch_size, total - step, rank, world, gen if p.augment else None,
                                  cfg.image_size)
        with Prefetcher(epoch, prepare, finish) as batches:  # one epoch: `gen` is the checkpoint's at its end
            for b in batches:
                y = b.y
                with autocast(cfg.precision, device):  # forward and loss (fp32: no autocast)
                    logits = net(b.x)
                    if world > 1:  # DDP averages gradients over processes: scale so the result is the full-batch mean
                        ce = F.cross_entropy(logits, y, reduction="sum") * (world / b.n_global)
                    else:
                        ce = F.cross_entropy(logits, y)
                    loss = ce + method.regularization()
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # fp16 on CUDA: loss scaling; otherwise a pass-through
                scaler.step(opt)
                scaler.update()
                sched.step()
                batch_correct = (logits.detach().argmax(1) == y).sum()
                correct += batch_correct
                seen += len(y)
                step += 1
                log.add(loss, batch_correct / max(len(y), 1), f"pretraining loss at step {step}")
                bar.update(1)
                if log.row_due(step):  # the only host synchronisation of the loop, every curve row
                    mean = log.flush(step)
                    bar.set_postfix(loss=f"{mean:.3f}")
                    if status is not None:
                        status.loss = mean
                if status is not None:
                    status.step = step  # a Python int: the progress line reads only host values
                if validator.due(step):
                    stop = validator.validate(step, stage_curve.rows)
                    if status is not None:
                        status.val_accuracy = validator.history[-1]["accuracy"]
                    if stop:
                        break  # early stop (val_patience)
        log.flush(step)  # before the checkpoint: never save weights past a non-finite loss
        if partial is not None and step < total and validator.stopped_at is None:
            atomic_torch_save({"module": module.state_dict(), "head": head.state_dict(), "optimizer": opt.state_dict(),
                               "scaler": scaler.state_dict(),
                               "scheduler": sched.state_dict(), "generator": gen.get_state(),
                               "torch_rng": torch.get_rng_state(), "step": step, "curve": stage_curve.rows,
                               "validation": validator.state_dict()}, partial)
    bar.close()
    if world > 1:
        import torch.distributed as dist

        counts = torch.stack([correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=device)])
        dist.all_reduce(counts)
        correct, seen = counts[0], int(counts[1])
    acc = float(correct) / max(seen, 1)
    validation = validator.finish(step)  # loads the selected weights into `module` (val_select: best)
    how = trained_with(module, device, compiled)
    if rank == 0:
        atomic_torch_save({"module": module.state_dict(), "train_accuracy": acc, "world_size": world,
                           "sync_bn": sync_bn, "curve": stage_curve.rows, "validation": validation, "steps": step,
                           "trained_with": how}, path)
        if partial is not None:
            partial.unlink(missing_ok=True)
    if world > 1:
        dist.barrier()
    if curve is not None:
        curve.extend(stage_curve.rows)
    return {"cache_path": str(path), "cached": False, "train_accuracy": acc, "world_size": world, "trained_with": how,
            **({"validation": validation} if validation else {})}


def trained_with(module: nn.Module, device: torch.device, compiled: bool) -> Dict[str, Any]:
    """How a pretraining was trained, as the process's switches stood (recorded in its cache file; the cache key
    leaves these out, as the run identity does): ``{"fast_mode", "deterministic", "compiled", "device", "torch"}``,
    ``fast_mode`` as a run's (:func:`~fewshot_nsl.precision.fast_mode_text`). A run that reuses the cache says
    when it differs from its own (:func:`fewshot_nsl.runner.train`)."""
    from .precision import fast_mode_text

    cuda = device.type == "cuda"
    last = any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
               for p in module.parameters())
    switches = {"cudnn_benchmark": cuda and torch.backends.cudnn.benchmark,
                "tf32": cuda and torch.backends.cuda.matmul.allow_tf32, "channels_last": cuda and last}
    return {"fast_mode": fast_mode_text(switches), "deterministic": torch.are_deterministic_algorithms_enabled(),
            "compiled": bool(compiled), "device": device.type, "torch": str(torch.__version__)}


# ----------------------------------------------------------------------------- base-class features (plugins' fit_base)
#: Images per forward pass when the base-class features are computed.
FEATURE_BATCH = 256


def base_features(
    module: nn.Module, store: ImageStore, cfg: RunConfig, device: torch.device, pretrain_path: Path,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The pretrained ``module``'s features of every base-class (``train`` split) training image, with their labels,
    for :meth:`FewShotMethod.fit_base <fewshot_nsl.methods.base.FewShotMethod.fit_base>`.

    Computed once per pretraining, in eval mode, in float32, without augmentation, and cached next to the
    pretraining as ``<pretraining key>.base_features.pt``: they are a function of the pretrained weights, hence of
    the pretraining key (dataset content, image size, backbone and conv config, pretraining settings, seed,
    precision), all of which the run's identity covers.

    Args:
        module: the pretrained module (``method.pretrain_module()``): ``(B, 3, H, W)`` -> ``(B, D)``.
        pretrain_path: the pretraining's cache file (:func:`pretrain_cache_path`).

    Returns:
        ``(features (N, D) float32, labels (N,) int64 in 0..n_base_classes-1)`` on ``device``, in store order.
    """
    path = Path(pretrain_path).with_name(Path(pretrain_path).stem + ".base_features.pt")
    if path.is_file():
        ckpt = load_checkpoint(path, device)
        return ckpt["features"], ckpt["labels"]
    classes = store.classes_in_split("train")
    index = np.concatenate([store.class_members(c) for c in classes])
    remap = np.full(store.num_classes, -1, dtype=np.int64)
    remap[classes] = np.arange(len(classes))
    labels = torch.from_numpy(remap[store.labels[index]]).to(device)
    mat = Materialiser(store, cfg.image_size, device)
    was_training = module.training
    module.eval()
    chunks = []
    try:
        with torch.no_grad():
            for start in range(0, len(index), FEATURE_BATCH):
                x = mat.to_device(mat.gather(index[start : start + FEATURE_BATCH]))
                chunks.append(module(x).float().flatten(1))
    finally:
        module.train(was_training)
    features = torch.cat(chunks)
    atomic_torch_save({"features": features.cpu(), "labels": labels.cpu()}, path)
    return features, labels


# ----------------------------------------------------------------------------- episodic
def _training_episodes(sampler: EpisodeSampler, n: int) -> Iterator[Tuple[Dict[str, Any], Episode]]:
    """``n`` training episodes of ``sampler``, each with the generator state it was drawn from."""
    for _ in range(n):
        state = sampler.rng.bit_generator.state
        yield state, next(sampler)


def _episode_stages(mat: Materialiser) -> Tuple[Callable, Callable]:
    """``(prepare, finish)`` of a :class:`Prefetcher` over :func:`_training_episodes`: ``(episode, EpisodeTensors)``."""
    return stages(lambda item: (item[1], mat.stage(item[1])), lambda p: (p[0], mat.load(p[1])))


def _sampler_state(sampler: EpisodeSampler, stream: Prefetcher) -> Dict[str, Any]:
    """The sampler's generator state after the last episode trained on: the state the first episode drawn ahead
    by the input pipeline was drawn from (a resumed run draws that episode again)."""
    ahead = stream.pending()
    return ahead[0][0] if ahead else sampler.rng.bit_generator.state


def meta_train(
    method: FewShotMethod,
    store: ImageStore,
    cfg: RunConfig,
    device: torch.device,
    checkpoint_path: Path,
    progress: bool = True,
    curve: Optional[List[Dict[str, Any]]] = None,
    status: Optional[RunStatus] = None,
) -> Dict[str, Any]:
    """Episodic training with Adam over ``method``'s trainable parameters.

    Each optimiser step averages :meth:`FewShotMethod.loss` over ``meta_batch`` episodes.
    With ``episodic.lr_step`` the learning rate is multiplied by ``lr_gamma`` every ``lr_step``
    steps; with ``episodic.grad_clip`` the gradient norm of each of
    :meth:`FewShotMethod.clip_groups` is clipped to it before the step.
    A checkpoint (method, optimiser, sampler state, step) is written every
    ``checkpoint_every`` steps and at the end; an existing one is resumed from.
    When ``curve`` is given, the stage's training-curve rows (:mod:`fewshot_nsl.curves`: loss,
    and query accuracy where the loss goes through the method's logits) are appended to it.
    ``status`` (a :class:`~fewshot_nsl.console.RunStatus`) gets the step, the loss of each curve row and
    each validation's accuracy (host values only), and a line saying where a resumed stage goes on from.

    Returns:
        ``{"steps": int, "final_loss": float, "resumed_from": int}``.
    """
    e = cfg.episodic
    ways = e.ways or cfg.ways
    shots = e.shots or cfg.shots
    sampler = EpisodeSampler(store, "train", ways, shots, e.queries, seed=cfg.seed + 1)
    mat = Materialiser(store, cfg.image_size, device)
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=e.lr)
    scaler = grad_scaler(cfg.precision, device)
    validator = StageValidator("episodic", ValidationSettings.of(e), cfg, store, device,
                               lambda t, i: run_episode(method, t.support_x, t.support_y, t.query_x, i), method)
    start, last = 0, float("nan")
    curve_rows: List[Dict[str, Any]] = []
    if Path(checkpoint_path).is_file():
        # read on the CPU: RNG states must stay CPU byte tensors; load_state_dict copies weights to their device
        ckpt = load_checkpoint(checkpoint_path, torch.device("cpu"))
        method.load_state_dict(ckpt["method"])
        opt.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        sampler.rng.bit_generator.state = json.loads(ckpt["sampler"])
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        set_host_rng_states(ckpt)
        start, last = int(ckpt["step"]), float(ckpt["loss"])
        curve_rows = ckpt.get("curve", [])
        validator.load_state_dict(ckpt.get("validation"))
        if status is not None:
            status.note(f"resuming episodic training from its checkpoint: step {start} of {e.steps}")
    if status is not None:
        status.begin("episodic", e.steps, start)
        status.loss = None if math.isnan(last) else last
    stage_curve = StageCurve("episodic", e.steps, curve_rows)
    log = IntervalLog(stage_curve)
    probe = LogitsProbe(method)
    method.train()
    bar = tqdm(total=e.steps, initial=start, desc=f"meta-train {cfg.method}", disable=not progress, unit="step")

    def save(step: int) -> None:
        atomic_torch_save(
            {
                "method": method.state_dict(),
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(),
                "sampler": json.dumps(_sampler_state(sampler, stream)),
                "torch_rng": torch.get_rng_state(),
                **host_rng_states(),
                "step": step,
                "loss": last,
                "curve": stage_curve.rows,
                "validation": validator.state_dict(),
            },
            checkpoint_path,
        )

    clip_groups = [[p for p in g if p.requires_grad] for g in method.clip_groups()] if e.grad_clip else []
    done = start  # optimiser steps finished
    steps = range(start, e.steps if validator.stopped_at is None else start)
    # the next episode is drawn here, in order, and gathered in a background thread while this one trains
    with Prefetcher(_training_episodes(sampler, len(steps) * e.meta_batch), *_episode_stages(mat)) as stream:
        for step in steps:
            if e.lr_step:  # step schedule (Snell et al., Sung et al.): lr * gamma^(step // lr_step); resumes exactly
                for group in opt.param_groups:
                    group["lr"] = e.lr * e.lr_gamma ** (step // e.lr_step)
            opt.zero_grad(set_to_none=True)
            for i in range(e.meta_batch):
                episode, t = next(stream)
                try:
                    with autocast(cfg.precision, device):  # the method's forward passes and loss (fp32: no autocast)
                        loss = method.loss(t.support_x, t.support_y, t.query_x, t.query_y)
                    scaler.scale(loss / e.meta_batch).backward()
                except (FewShotError, torch.OutOfMemoryError):
                    raise
                except Exception as exc:  # the method's own bug (a plugin's): one line naming the call and where
                    where = f"training step {step + 1} of {e.steps} (training episode {step * e.meta_batch + i + 1})"
                    raise MethodError(_method_error(method, exc, "loss", where, checkpoint_path.parent,
                                                    "episodic training resumes from its last checkpoint")) from exc
                # kept on the device; read and checked once per curve row (IntervalLog), not per episode
                log.add(loss, probe.accuracy_tensor(t.query_y),
                        f"{cfg.method} training loss at step {step + 1} of {e.steps} (training episode "
                        f"{step * e.meta_batch + i + 1}, classes {', '.join(episode.classes)})")
            reg = method.regularization()
            if reg.requires_grad:
                scaler.scale(reg).backward()
            scaler.unscale_(opt)  # clipping sees the true gradients (fp16 loss scaling)
            method.clip_gradients()  # the method's own clipping (its source's), before the config's norm clip
            for group in clip_groups:  # each group's norm clipped separately, as Sung et al. clip encoder and relation net
                torch.nn.utils.clip_grad_norm_(group, e.grad_clip)
            scaler.step(opt)
            scaler.update()
            bar.update(1)
            done = step + 1
            if status is not None:
                status.step = done  # a Python int: the progress line reads only host values
            stop = False
            if validator.due(done):
                stop = validator.validate(done, stage_curve.rows)
                probe.forget()  # the validation's logits: the next step's probe reads its own
                if status is not None:
                    status.val_accuracy = validator.history[-1]["accuracy"]
            checkpoint = done % e.checkpoint_every == 0 or done == e.steps or stop
            if log.row_due(done) or checkpoint:  # the loop's only host synchronisation (and never a NaN checkpoint)
                mean = log.flush(done)
                if mean is not None:
                    last = mean
                    bar.set_postfix(loss=f"{mean:.3f}")
                    if status is not None:
                        status.loss = mean
            if checkpoint:
                save(done)
            if stop:  # early stop (val_patience)
                break
    bar.close()
    probe.close()
    validation = validator.finish(done)  # loads the selected weights into `method` (val_select: best)
    if curve is not None:
        curve.extend(stage_curve.rows)
    return {"steps": done, "final_loss": last, "resumed_from": start, **({"validation": validation} if validation else {})}
