"""Validation of a training stage on fixed validation episodes: curves, best-checkpoint selection, early stopping.

Every ``val_every`` optimiser steps of a stage (``pretrain.val_*`` / ``episodic.val_*`` in the config), the
stage's model is evaluated on the first ``val_episodes`` episodes of the fixed validation list (the committed
``episodes/<dataset>/val_<W>w<S>s<Q>q_600_seed0.json``, or one generated once from the store's ``val`` classes
beside the test lists a run generates). Ways, shots and queries are the evaluation's.

* Episodic stage: the method itself, as the evaluation harness runs it (``fit_support`` then ``forward`` in eval
  mode under ``torch.no_grad()``, :func:`fewshot_nsl.evaluation.run_episode`); loss = the cross-entropy of its
  logits for the queries.
* Pretraining: the pretrained module's features with a nearest-class-mean (ProtoNet) classifier, logits = minus
  squared distances to the support means: a method-independent read of how well the features transfer.

Each validation is a row of the training curve (stage ``<stage>-val``: ``training_curve.csv``, the plot and
TensorBoard). With ``val_select: best`` the stage ends with the weights of the best validation (by
``val_metric``: ``accuracy``, higher is better, or ``loss``, lower is better), as Chen et al. keep
``best_model.tar`` and Snell et al. ``best_model.pt``; with ``val_patience: P`` the stage stops once ``P``
validations in a row did not improve on the best (Snell et al.'s ``wait > patience``). The validation runs in a
forked RNG state, each episode seeded from ``(seed, episode)``, so a stage's training is the same step for step
with and without validation. The validator's state (history, best weights, patience counter) travels in the
stage's checkpoints, so a resumed stage selects and stops as an uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import RunConfig
from .data.episodes import EpisodeList, EpisodeTensors, Materialiser, default_episode_path, episode_list_for_store
from .data.store import ImageStore, check_min_images
from .errors import ConfigError
from .precision import autocast

#: ``val_metric`` choices and whether higher is better.
METRICS = {"accuracy": True, "loss": False}
SELECTIONS = ("last", "best")


@dataclass(frozen=True)
class ValidationSettings:
    """The ``val_*`` keys of one stage's config section.

    Attributes:
        every: optimiser steps between validations (``None``: no validation).
        episodes: validation episodes per validation (the first ones of the fixed list).
        metric: ``accuracy`` or ``loss``: what "best" and "improved" mean.
        select: ``last`` (the stage's final weights) or ``best`` (the weights of the best validation).
        patience: stop after this many validations in a row without improvement (``None``: never).
    """

    every: Optional[int] = None
    episodes: int = 100
    metric: str = "accuracy"
    select: str = "last"
    patience: Optional[int] = None

    @classmethod
    def of(cls, section: Any) -> "ValidationSettings":
        """Read from a :class:`~fewshot_nsl.config.PretrainConfig` or :class:`~fewshot_nsl.config.EpisodicConfig`."""
        return cls(section.val_every, section.val_episodes, section.val_metric, section.val_select, section.val_patience)

    @property
    def enabled(self) -> bool:
        return self.every is not None


def check_settings(stage: str, s: ValidationSettings) -> None:
    """Refuse impossible ``<stage>.val_*`` settings (one line each).

    Raises:
        ConfigError: a non-positive interval, episode count or patience, an unknown metric or selection, or a
            selection / patience without validation.
    """
    if s.every is not None and (isinstance(s.every, bool) or s.every < 1):
        raise ConfigError(f"{stage}.val_every must be at least 1 (or null for no validation), got {s.every}")
    if s.episodes < 1:
        raise ConfigError(f"{stage}.val_episodes must be at least 1, got {s.episodes}")
    if s.metric not in METRICS:
        raise ConfigError(f"{stage}.val_metric must be one of {', '.join(METRICS)}, got '{s.metric}'")
    if s.select not in SELECTIONS:
        raise ConfigError(f"{stage}.val_select must be one of {', '.join(SELECTIONS)}, got '{s.select}'")
    if s.patience is not None and s.patience < 1:
        raise ConfigError(f"{stage}.val_patience must be at least 1 (or null), got {s.patience}")
    if not s.enabled and (s.select != "last" or s.patience is not None):
        raise ConfigError(f"{stage}.val_select: best and {stage}.val_patience need validation: set {stage}.val_every "
                          f"(optimiser steps between validations)")


def validation_list(cfg: RunConfig, store: ImageStore) -> EpisodeList:
    """The fixed validation episode list of ``cfg``'s ways/shots/queries on ``store``.

    The committed list where there is one; otherwise one generated once from seed 0 (600 episodes) and kept
    under ``<results_dir>/episodes/<dataset>-<fingerprint>/``, as :func:`fewshot_nsl.inputs.load_episodes` does
    for test lists.

    Raises:
        ConfigError: the dataset has no ``val`` classes (validation cannot run).
    """
    q = cfg.eval.queries
    path = default_episode_path(store.name, "val", cfg.ways, cfg.shots, q)
    if not path.is_file():
        if len(store.classes_in_split("val")) < cfg.ways:
            raise ConfigError(
                f"validation needs at least {cfg.ways} classes in the val split of {store.name}, which has "
                f"{len(store.classes_in_split('val'))}; add a val/ split to the data or set pretrain.val_every and "
                f"episodic.val_every to null"
            )
        path = Path(cfg.results_dir) / "episodes" / f"{store.name}-{store.fingerprint()}" / path.name
        if not path.is_file():
            check_min_images(store, "val", cfg.shots + q)
            episode_list_for_store(store, "val", cfg.ways, cfg.shots, q, 600, 0).save(path)
    lst = EpisodeList.load(path)
    lst.path = str(path)
    return lst


def validation_list_hash(cfg: RunConfig, store: ImageStore, stage: str) -> Optional[str]:
    """Content hash of the validation list stage ``stage`` (``pretrain`` / ``episodic``) reads, or None when the
    stage does not validate. With validation the selected weights (and an early stop) depend on that list, so it is
    part of the run's identity and of the pretraining cache key, like the test list."""
    if not ValidationSettings.of(getattr(cfg, stage)).enabled:
        return None
    return validation_list(cfg, store).sha256


def prototype_logits(features: nn.Module, t: EpisodeTensors) -> torch.Tensor:
    """Nearest-class-mean logits of an episode on ``features`` (``(B, 3, H, W)`` -> ``(B, ...)``).

    Returns:
        ``(n_query, ways)``: minus the squared Euclidean distances of the query features to the support means.

    ``ways`` is ``max(support_y) + 1``, read from the count the materialised labels carry (``episode_ways``) where
    they do, and the class counts are an ``index_add_`` of ones: no host synchronisation (``torch.bincount`` reads
    the labels' min and max on the host).
    """
    y = t.support_y
    known = getattr(y, "episode_ways", None)
    ways = int(known) if known is not None else int(y.max()) + 1
    s = features(t.support_x).flatten(1)
    q = features(t.query_x).flatten(1)
    means = torch.zeros(ways, s.shape[1], dtype=s.dtype, device=s.device).index_add_(0, y, s)
    counts = torch.zeros(ways, dtype=torch.long, device=y.device).index_add_(0, y, torch.ones_like(y, dtype=torch.long))
    means = means / counts.clamp_min(1).to(s.dtype)[:, None]
    return -torch.cdist(q, means).pow(2)


class StageValidator:
    """Periodic validation of one training stage (see the module docstring).

    Args:
        stage: ``pretrain`` or ``episodic`` (the curve rows are ``<stage>-val``).
        settings: the stage's :class:`ValidationSettings`.
        cfg: the run's config (ways, shots, queries, image size, seed).
        store: the dataset.
        device: where the episodes are materialised.
        logits_of: ``EpisodeTensors, episode index -> logits (n_query, ways)``, called with the model in eval mode
            under ``torch.no_grad()``.
        model: the module whose weights are selected (its ``state_dict`` is kept for the best validation).
    """

    def __init__(self, stage: str, settings: ValidationSettings, cfg: RunConfig, store: ImageStore,
                 device: torch.device, logits_of: Callable[[EpisodeTensors, int], torch.Tensor], model: nn.Module) -> None:
        self.stage, self.s, self.seed, self.device = stage, settings, cfg.seed, device
        self.precision = cfg.precision
        self.logits_of, self.model = logits_of, model
        self.episodes: Optional[EpisodeList] = None
        if settings.enabled:
            self.episodes = validation_list(cfg, store)
            if settings.episodes > len(self.episodes):
                raise ConfigError(f"{stage}.val_episodes is {settings.episodes} but the validation list "
                                  f"{self.episodes.path} has {len(self.episodes)}; use at most that many")
            self.mat = Materialiser(store, cfg.image_size, device)
        self.history: List[Dict[str, Any]] = []
        self.best: Optional[Dict[str, Any]] = None  # {"step", "loss", "accuracy"}
        self.best_state: Optional[Dict[str, torch.Tensor]] = None
        self.wait = 0
        self.stopped_at: Optional[int] = None

    # ------------------------------------------------------------------ the loop's calls
    def due(self, step: int) -> bool:
        """Whether to validate after optimiser step ``step`` (1-based)."""
        return self.s.enabled and step % self.s.every == 0

    def measure(self) -> Dict[str, float]:
        """Mean query loss and accuracy over the validation episodes (model in eval mode, RNG forked)."""
        from .evaluation import episode_seed, seed_torch

        assert self.episodes is not None
        was_training = self.model.training
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        losses, accs = [], []
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                for i in range(self.s.episodes):
                    seed_torch(episode_seed(self.seed, i), self.device)
                    t = self.mat(self.episodes.episodes[i])
                    with autocast(self.precision, self.device):
                        logits = self.logits_of(t, i).float()
                    if torch.isfinite(logits).all():
                        losses.append(F.cross_entropy(logits, t.query_y, reduction="sum"))
                        accs.append((logits.argmax(1) == t.query_y).sum())
                    else:  # a failed episode counts as wrong, with an infinite loss
                        losses.append(logits.new_tensor(math.inf))
                        accs.append(logits.new_tensor(0.0))
            n = self.s.episodes * len(t.query_y)
            return {"loss": float(torch.stack(losses).sum()) / n, "accuracy": float(torch.stack(accs).sum()) / n}
        finally:
            self.model.train(was_training)

    def validate(self, step: int, curve_rows: List[Dict[str, Any]]) -> bool:
        """Validate after step ``step``, add the curve row, keep the best weights; True when the stage should stop."""
        m = self.measure()
        row = {"stage": f"{self.stage}-val", "step": int(step), "loss": round(m["loss"], 6),
               "accuracy": round(m["accuracy"], 6)}
        curve_rows.append(row)
        self.history.append({"step": int(step), **m})
        key, higher = self.s.metric, METRICS[self.s.metric]
        improved = self.best is None or (m[key] > self.best[key] if higher else m[key] < self.best[key])
        if improved:
            self.best = {"step": int(step), **m}
            self.wait = 0
            if self.s.select == "best":
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        else:
            self.wait += 1
        if self.s.patience is not None and self.wait > self.s.patience:
            self.stopped_at = int(step)
            return True
        return False

    def finish(self, final_step: int) -> Dict[str, Any]:
        """Load the selected weights into the model and return the stage's validation record."""
        if not self.s.enabled:
            return {}
        selected = final_step
        if self.s.select == "best" and self.best_state is not None and self.best is not None:
            self.model.load_state_dict(self.best_state)
            selected = self.best["step"]
        assert self.episodes is not None
        return {
            "every": self.s.every, "episodes": self.s.episodes, "metric": self.s.metric, "select": self.s.select,
            "patience": self.s.patience, "list": Path(self.episodes.path).name, "list_hash": self.episodes.sha256,
            "validations": len(self.history), "best_step": self.best["step"] if self.best else None,
            "best_loss": round(self.best["loss"], 6) if self.best else None,
            "best_accuracy": round(self.best["accuracy"], 6) if self.best else None,
            "last": self.history[-1] if self.history else None,
            "selected_step": selected, "stopped_early_at": self.stopped_at,
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        return {"history": self.history, "best": self.best, "best_state": self.best_state, "wait": self.wait,
                "stopped_at": self.stopped_at}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        if not state:
            return
        self.history = list(state.get("history", []))
        self.best, self.best_state = state.get("best"), state.get("best_state")
        self.wait, self.stopped_at = int(state.get("wait", 0)), state.get("stopped_at")
