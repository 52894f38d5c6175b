"""One benchmark run: data -> backbone -> method -> training -> evaluation -> leaderboard row.

A run is identified by ``<dataset>_<method>_<backbone>_<W>w<S>s_<profile>_seed<seed>_<config hash>``
and lives in ``<results_dir>/runs/<run_id>/``:

* ``config.yaml``: the resolved config;
* ``checkpoint.pt`` / ``method.pt``: episodic-training checkpoint / trained method;
* ``episodes.csv``: one row per evaluated episode, written as it finishes;
* ``summary.json``: the leaderboard row of this run.

Running the same command again resumes: finished training and episodes are not redone.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .config import RunConfig, save_config
from .data.episodes import (
    EpisodeList,
    check_episodes_match_store,
    default_episode_path,
    episode_list_for_store,
)
from .data.store import ImageStore, check_min_images, default_cache_dir
from .errors import ConfigError, DataError
from .evaluation import evaluate
from .methods.base import FewShotMethod
from .registry import REPO_ROOT, check_kwargs, create_backbone, create_dataset, get_method_class
from .reporting import paper_value, render_reports, upsert_row
from .stats import summarize
from .training import atomic_torch_save, meta_train, pretrain, resolve_device, set_seed

TRAINING_STAGES = ("pretrain", "episodic")


def git_info() -> Dict[str, Any]:
    """``{"git_commit": sha or "unknown", "git_dirty": bool}`` of the suite's checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return {"git_commit": sha or "unknown", "git_dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": False}


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on GPU runs; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_id(cfg: RunConfig) -> str:
    return f"{cfg.dataset}_{cfg.method}_{cfg.backbone}_{cfg.ways}w{cfg.shots}s_{cfg.profile}_seed{cfg.seed}_{cfg.hash()[:8]}"


def load_store(cfg: RunConfig) -> ImageStore:
    """Create the dataset store (cached) with the run's image size."""
    return create_dataset(
        cfg.dataset, data_root=cfg.data_root, image_size=cfg.image_size, cache_dir=_stores_dir(cfg), **cfg.dataset_options
    )


def _stores_dir(cfg: RunConfig) -> Optional[str]:
    return str(Path(cfg.cache_dir) / "stores") if cfg.cache_dir else None


def load_episodes(cfg: RunConfig, store: ImageStore) -> EpisodeList:
    """The fixed test episode list: ``--episodes FILE``, the committed list, or one generated once."""
    q = cfg.eval.queries
    if cfg.episodes_file:
        lst = EpisodeList.load(Path(cfg.episodes_file))
    else:
        path = default_episode_path(store.name, cfg.eval.split, cfg.ways, cfg.shots, q)
        if not path.is_file():
            # No committed list for this dataset/setting: generate one from seed 0 once and keep it.
            path = Path(cfg.results_dir) / "episodes" / f"{store.name}-{store.fingerprint()}" / path.name
            if not path.is_file():
                check_min_images(store, cfg.eval.split, cfg.shots + q)
                episode_list_for_store(store, cfg.eval.split, cfg.ways, cfg.shots, q, 600, 0).save(path)
        lst = EpisodeList.load(path)
    if (lst.ways, lst.shots, lst.queries) != (cfg.ways, cfg.shots, q):
        raise ConfigError(
            f"episode list {cfg.episodes_file} is {lst.ways}-way {lst.shots}-shot {lst.queries}-query but the run asks "
            f"for {cfg.ways}-way {cfg.shots}-shot {q}-query; pass matching --ways/--shots or another --episodes file"
        )
    check_episodes_match_store(lst, store)
    lst.path = str(path if not cfg.episodes_file else cfg.episodes_file)  # type: ignore[attr-defined]
    return lst


def build_method(cfg: RunConfig) -> FewShotMethod:
    """Backbone (with the method's conv spec, overridden by ``cfg.conv``) and method."""
    method_cls = get_method_class(cfg.method)
    check_kwargs(method_cls, cfg.method_options, f"method '{cfg.method}'")
    conv_spec = conv_spec_of(cfg)
    conv_layer = None
    if conv_spec and conv_spec.get("kind", "plain") != "plain":
        from .nn import make_conv_factory

        conv_layer = make_conv_factory(**conv_spec)
    backbone = create_backbone(cfg.backbone, conv_layer=conv_layer, **cfg.backbone_options)
    return method_cls(backbone=backbone, image_size=cfg.image_size, **cfg.method_options)


def conv_spec_of(cfg: RunConfig) -> Dict[str, Any]:
    method_cls = get_method_class(cfg.method)
    return {**method_cls.default_conv, **cfg.conv}


def validate_against_store(cfg: RunConfig, store: ImageStore) -> None:
    """Impossible ways/shots fail here, before any training."""
    n_test = len(store.classes_in_split(cfg.eval.split))
    if cfg.ways > n_test:
        raise ConfigError(
            f"--ways {cfg.ways} is more than the {n_test} {cfg.eval.split} classes of {store.name}; lower --ways"
        )
    check_min_images(store, cfg.eval.split, cfg.shots + cfg.eval.queries)
    method_cls = get_method_class(cfg.method)
    if "episodic" in method_cls.training_stages:
        ways = cfg.episodic.ways or cfg.ways
        n_train = len(store.classes_in_split("train"))
        if ways > n_train:
            raise ConfigError(f"training ways {ways} exceed the {n_train} base classes of {store.name}; lower --ways")
        check_min_images(store, "train", (cfg.episodic.shots or cfg.shots) + cfg.episodic.queries)


def run(cfg: RunConfig, progress: bool = True, log=print) -> Dict[str, Any]:
    """Run (or resume) one benchmark cell and upsert its leaderboard row.

    Returns:
        The leaderboard row (dict).
    """
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    set_seed(cfg.seed, cfg.deterministic)
    method_cls = get_method_class(cfg.method)
    unknown_stage = set(method_cls.training_stages) - set(TRAINING_STAGES)
    if unknown_stage:
        raise ConfigError(f"method {cfg.method} declares unknown training stage(s) {sorted(unknown_stage)}")
    store = load_store(cfg)
    validate_against_store(cfg, store)
    episodes = load_episodes(cfg, store)
    method = build_method(cfg).to(device)

    rid = run_id(cfg)
    run_dir = Path(cfg.results_dir) / "runs" / rid
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    log(f"run {rid} on {device} ({store.name}{', synthetic' if store.synthetic else ''}; "
        f"{len(episodes)} episodes in {Path(episodes.path).name}, hash {episodes.sha256})")

    t_train = time.perf_counter()
    info: Dict[str, Any] = {}
    trained = run_dir / "method.pt"
    if "pretrain" in method_cls.training_stages:
        cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        info["pretrain"] = pretrain(method, store, cfg, device, conv_spec_of(cfg), cache, progress)
        log(f"pretraining: {'reused cache' if info['pretrain']['cached'] else 'trained'} "
            f"(base-class train accuracy {100 * info['pretrain']['train_accuracy']:.1f}%)")
        method.after_pretrain()
        method.to(device)
    if trained.is_file():
        method.load_state_dict(torch.load(trained, map_location=device, weights_only=True))
    elif "episodic" in method_cls.training_stages:
        info["episodic"] = meta_train(method, store, cfg, device, run_dir / "checkpoint.pt", progress)
        atomic_torch_save(method.state_dict(), trained)
    else:
        atomic_torch_save(method.state_dict(), trained)
    train_time = time.perf_counter() - t_train

    t_eval = time.perf_counter()
    accs = evaluate(method, store, episodes, cfg.eval.episodes, device, cfg.image_size, run_dir / "episodes.csv",
                    seed=cfg.seed, progress=progress)
    eval_time = time.perf_counter() - t_eval
    s = summarize(accs)
    pv, pc = paper_value(cfg.method, cfg.backbone, cfg.ways, cfg.shots)
    n_params = sum(p.numel() for p in method.parameters())
    row: Dict[str, Any] = {
        "dataset": store.name, "method": cfg.method, "backbone": cfg.backbone, "ways": cfg.ways,
        "shots": cfg.shots, "profile": cfg.profile,
        "accuracy": round(s.mean, 4), "ci95": round(s.ci95, 4), "ci95_t": round(s.ci95_t, 4), "std": round(s.std, 4),
        "episodes": s.n, "episodes_failed": int(sum(a != a for a in accs)),
        "paper_value": pv, "paper_ci": pc, "image_size": cfg.image_size, "synthetic": store.synthetic,
        "episode_list": os.path.relpath(episodes.path, REPO_ROOT) if Path(episodes.path).is_absolute() else episodes.path,
        "episode_hash": episodes.sha256, "dataset_fingerprint": store.fingerprint(), "config_hash": cfg.hash(),
        "seeds": str(cfg.seed), "params": n_params, "train_time_s": round(train_time, 2),
        "eval_time_s": round(eval_time, 2), "wall_time_s": round(time.perf_counter() - t0, 2),
        "peak_memory_mb": round(peak_memory_mb(device), 1), "device": str(device),
        "torch_version": torch.__version__, **git_info(), "run_id": rid,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (run_dir / "summary.json").write_text(json.dumps({**row, "training": info}, indent=1, default=str))
    results = Path(cfg.results_dir)
    upsert_row(results / "leaderboard.csv", row)
    render_reports(results)
    return row
