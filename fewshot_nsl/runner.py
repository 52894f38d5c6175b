"""One benchmark run: data -> backbone -> method -> training -> evaluation -> summary.

A run is one (cell, seed): identified by
``<dataset>_<method>_<backbone>_<W>w<S>s[_<split>]_<profile>_seed<seed>_<identity digest>`` and
living in ``<results_dir>/runs/<run_id>/``. The identity digest covers everything that determines
the numbers (:mod:`fewshot_nsl.identity`: config, dataset content, episode list and split, code,
world size), so a run is resumed or reused only under the same identity:

* ``identity.json``: the identity's components (written first; a folder whose ``identity.json``
  differs is never written into);
* ``config.yaml``: the resolved config;
* ``checkpoint.pt``: episodic-training checkpoint (model, optimiser, sampler and RNG states);
* ``method.pt``: the trained method; ``train.json``: training time, parameter count, peak memory;
* ``training_curve.csv``, ``training_curves.png`` (and ``tensorboard/`` with the optional extra):
  loss and accuracy every N training steps (:mod:`fewshot_nsl.curves`);
* ``episodes.csv``: one row per evaluated episode, appended and fsync'ed as it finishes;
* ``shards/``: per-task episode CSVs while a Ray evaluation is in flight (merged, then removed);
* ``summary.json``: the run's result and provenance (written last, atomically: its presence
  with the same identity means "complete").

The stages are separate functions so executors can place them: :func:`prepare`,
:func:`train`, :func:`evaluate_run` (optionally on a subset of episodes) and :func:`finish`.
:func:`execute` chains them in this process; :func:`aggregate` turns the summaries of a cell's
seeds into its leaderboard row; :func:`run` does one cell with one seed, end to end.
Running the same thing again resumes: finished training and episodes are not redone.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import platform
import resource
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import RunConfig, save_config
from .curves import write_curves
from .data.episodes import (
    EPISODES_DIR,
    EpisodeList,
    check_episodes_match_store,
    default_episode_path,
    episode_list_for_store,
)
from .data.store import ImageStore, check_min_images, default_cache_dir
from .errors import ConfigError, DataError
from .evaluation import FIELDS, evaluate, read_episode_results
from .identity import RunIdentity, method_code_hash
from .safe_io import atomic_write, atomic_write_json, remove_stale_tmp
from .methods.base import FewShotMethod
from .registry import check_kwargs, create_backbone, create_dataset, get_method_class
from .reporting import paper_comparable, paper_value, render_reports, upsert_row
from .stats import summarize
from .training import (
    atomic_torch_save,
    cached_world_size,
    load_checkpoint,
    meta_train,
    pretrain,
    pretrain_cache_path,
    resolve_device,
    set_seed,
)

TRAINING_STAGES = ("pretrain", "episodic")


# ----------------------------------------------------------------------------- provenance helpers
def git_info() -> Dict[str, Any]:
    """``{"version": package version, "git_commit": sha, "git_dirty": bool}``; the commit only when
    the suite runs from a git checkout (None for an installed copy, see :mod:`fewshot_nsl.resources`)."""
    from .resources import git_info as _git, version

    return {"version": version(), **_git()}


def device_name(device: torch.device) -> str:
    """GPU model, or the CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA peak stats on GPU, the RSS high-water mark on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux >= 4.0: writing 5 resets VmHWM (the peak resident set size) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated (GPU), else the process's peak resident set size since the last
    :func:`reset_peak_memory` (``VmHWM``; ``ru_maxrss``, the lifetime peak, where unavailable)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0




def _display_path(path: Path, results_dir: Path) -> str:
    """``path`` relative to the folder holding the committed ``episodes/`` (the checkout or the
    installed package: ``episodes/<dataset>/...`` either way) or to the results folder (generated
    lists: ``episodes/...``), else absolute."""
    if not path.is_absolute():
        return str(path)
    for base in (EPISODES_DIR.parent, results_dir.resolve()):
        try:
            return str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            continue
    return str(path)


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- identity
def config_hash(cfg: RunConfig) -> str:
    """``cfg.hash()`` without the training sections this run's method does not use (``pretrain`` for
    an episodic-only method, ``episodic`` for a pretraining-only one): changing, say, the pretraining
    epochs does not make MAML's finished runs look stale."""
    stages = stages_of(cfg)
    return cfg.hash(omit=[s for s in TRAINING_STAGES if s not in stages])


def run_identity(cfg: RunConfig, store: Optional[ImageStore] = None, episodes: Optional[EpisodeList] = None) -> RunIdentity:
    """The run's :class:`~fewshot_nsl.identity.RunIdentity` (loads the store and episode list
    when not given). The world size is that of the cached pretraining the run will use (1 when
    it is not cached yet: the run trains it in one process)."""
    store = store if store is not None else load_store(cfg)
    episodes = episodes if episodes is not None else load_episodes(cfg, store)
    method_cls = get_method_class(cfg.method)
    world = 1
    if "pretrain" in stages_of(cfg):
        cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        world = cached_world_size(pretrain_cache_path(cfg, store, conv_spec_of(cfg), method_cls, cache))
    return RunIdentity(config_hash=config_hash(cfg), dataset_fingerprint=store.fingerprint(),
                       episode_hash=episodes.sha256, split=episodes.split, code_hash=method_code_hash(method_cls),
                       world_size=world)


def run_id(cfg: RunConfig, identity: Optional[RunIdentity] = None) -> str:
    """``<dataset>_<method>_<backbone>_<W>w<S>s[_<split>]_<profile>_seed<seed>_<identity digest[:8]>``
    (the split is named when it is not ``test``)."""
    identity = identity or run_identity(cfg)
    split = "" if identity.split == "test" else f"_{identity.split}"
    return (f"{cfg.dataset}_{cfg.method}_{cfg.backbone}_{cfg.ways}w{cfg.shots}s{split}_{cfg.profile}_seed{cfg.seed}_"
            f"{identity.digest()[:8]}")


def run_dir_of(cfg: RunConfig, identity: Optional[RunIdentity] = None) -> Path:
    return Path(cfg.results_dir) / "runs" / run_id(cfg, identity)


def claim_run_dir(rdir: Path, identity: RunIdentity) -> None:
    """Create ``rdir`` for ``identity`` or check that it already belongs to it.

    Raises:
        DataError: the folder holds a run of another identity (or of an unknown one): it is
            never resumed, reused or written into.
    """
    record = rdir / "identity.json"
    if record.is_file():
        recorded = _read_json(record)
        diff = identity.differences(recorded) if isinstance(recorded, dict) else ["identity.json unreadable"]
        if diff:
            raise DataError(
                f"run folder {rdir} holds a run of another identity (differs in {', '.join(diff)}); "
                f"move it away or use another --results-dir"
            )
        return
    if rdir.is_dir() and any(rdir.iterdir()):
        raise DataError(
            f"run folder {rdir} has no identity.json (written by an older version or by hand); "
            f"move it away or use another --results-dir"
        )
    rdir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, identity.to_dict())


def cell_config_hash(cfg: RunConfig) -> str:
    """Hash of the resolved config with the seed set to 0: the same for every seed of a cell
    (the seeds are recorded apart); equal to :func:`config_hash` for seed 0."""
    return config_hash(dataclasses.replace(cfg, seed=0))


# ----------------------------------------------------------------------------- inputs
def load_store(cfg: RunConfig) -> ImageStore:
    """Create the dataset store (cached) with the run's image size."""
    return create_dataset(
        cfg.dataset, data_root=cfg.data_root, image_size=cfg.image_size, cache_dir=_stores_dir(cfg), **cfg.dataset_options
    )


def store_key(cfg: RunConfig) -> str:
    """What determines :func:`load_store`'s result (to share one store between cells)."""
    return json.dumps([cfg.dataset, cfg.data_root, cfg.image_size, _stores_dir(cfg), cfg.dataset_options],
                      sort_keys=True, default=str)


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
    if lst.split != cfg.eval.split:
        raise ConfigError(
            f"episode list {cfg.episodes_file or lst.path} is on the {lst.split} split but the run evaluates on "
            f"{cfg.eval.split} (eval.split); pass a list of that split or set eval.split: {lst.split}"
        )
    lst.path = str(path if not cfg.episodes_file else cfg.episodes_file)
    check_episodes_match_store(lst, store)
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


def stages_of(cfg: RunConfig) -> Tuple[str, ...]:
    """Training stages of this run (the method's, given its options)."""
    return tuple(get_method_class(cfg.method).stages(cfg.method_options))


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
    if "episodic" in stages_of(cfg):
        ways = cfg.episodic.ways or cfg.ways
        n_train = len(store.classes_in_split("train"))
        if ways > n_train:
            raise ConfigError(f"training ways {ways} exceed the {n_train} base classes of {store.name}; lower --ways")
        check_min_images(store, "train", (cfg.episodic.shots or cfg.shots) + cfg.episodic.queries)


# ----------------------------------------------------------------------------- stages
@dataclass
class RunContext:
    """What the stages of one run share."""

    cfg: RunConfig
    store: ImageStore
    episodes: EpisodeList
    device: torch.device
    run_dir: Path
    identity: RunIdentity
    method: Optional[FewShotMethod] = None

    @property
    def n_episodes(self) -> int:
        """Episodes evaluated: the first ``cfg.eval.episodes`` of the list."""
        return min(self.cfg.eval.episodes, len(self.episodes))

    @property
    def episodes_csv(self) -> Path:
        return self.run_dir / "episodes.csv"


def prepare(
    cfg: RunConfig,
    store: Optional[ImageStore] = None,
    episodes: Optional[EpisodeList] = None,
    log=print,
) -> RunContext:
    """Load and check the inputs of a run and create its folder (no training)."""
    device = resolve_device(cfg.device)
    unknown_stage = set(stages_of(cfg)) - set(TRAINING_STAGES)
    if unknown_stage:
        raise ConfigError(f"method {cfg.method} declares unknown training stage(s) {sorted(unknown_stage)}")
    store = store if store is not None else load_store(cfg)
    validate_against_store(cfg, store)
    episodes = episodes if episodes is not None else load_episodes(cfg, store)
    identity = run_identity(cfg, store, episodes)
    rdir = run_dir_of(cfg, identity)
    claim_run_dir(rdir, identity)
    remove_stale_tmp(rdir)  # left by a process killed mid-write
    if not (rdir / "config.yaml").is_file():
        save_config(cfg, rdir / "config.yaml")
    return RunContext(cfg, store, episodes, device, rdir, identity)


def train(ctx: RunContext, progress: bool = True, log=print) -> Dict[str, Any]:
    """Build the method and train it (or load it), leaving it in ``ctx.method``.

    Pretraining is cached across runs; episodic training checkpoints to ``checkpoint.pt`` and
    resumes; the trained method is ``method.pt``. ``train.json`` records the training time of
    the invocation that finished training, the parameter count and the peak memory.

    Returns:
        The ``train.json`` record.
    """
    cfg, device = ctx.cfg, ctx.device
    reset_peak_memory(device)
    t0 = time.perf_counter()
    # Seeded right before the model is built, so the initial weights do not depend on whether the
    # dataset was generated or loaded from its cache in this process.
    set_seed(cfg.seed, cfg.deterministic)
    method = build_method(cfg).to(device)
    info: Dict[str, Any] = {}
    curve: List[Dict[str, Any]] = []  # training-curve rows of every stage (fewshot_nsl.curves)
    trained = ctx.run_dir / "method.pt"
    stages = stages_of(cfg)
    if "pretrain" in stages:
        cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        pre = pretrain(method, ctx.store, cfg, device, conv_spec_of(cfg), cache, progress, curve=curve)
        # recorded relative to the cache dir: train.json/summary.json hold no machine-specific paths
        cache_file = Path(pre.pop("cache_path")).relative_to(cache).as_posix()
        info["pretrain"] = {"cache_file": cache_file, **pre}
        if int(pre.get("world_size", 1)) != ctx.identity.world_size:
            raise DataError(
                f"the cached pretraining {cache_file} was replaced while this run started (world size "
                f"{pre.get('world_size', 1)}, expected {ctx.identity.world_size}); run the command again"
            )
        log(f"pretraining: {'reused cache' if info['pretrain']['cached'] else 'trained'} "
            f"(base-class train accuracy {100 * info['pretrain']['train_accuracy']:.1f}%)")
        method.after_pretrain()
        method.to(device)
    record_path = ctx.run_dir / "train.json"
    fresh = not trained.is_file()
    record = None if fresh else _read_json(record_path)
    if fresh:
        if "episodic" in stages:
            info["episodic"] = meta_train(method, ctx.store, cfg, device, ctx.run_dir / "checkpoint.pt", progress,
                                          curve=curve)
        write_curves(ctx.run_dir, curve, title=ctx.run_dir.name)  # training_curve.csv, training_curves.png
        atomic_torch_save(method.state_dict(), trained)
    else:
        method.load_state_dict(load_checkpoint(trained, device))
    if record is None:  # trained now (or killed between method.pt and train.json: time unknown)
        resumed = bool(info.get("episodic", {}).get("resumed_from", 0))
        record = {
            "train_time_s": round(time.perf_counter() - t0, 2) if fresh else None,
            "params": int(sum(p.numel() for p in method.parameters())),
            "peak_memory_mb": round(peak_memory_mb(device), 1),
            "pretrain_world_size": int(info.get("pretrain", {}).get("world_size", 1)),
            "resumed": resumed,
            "training": info,
        }
        atomic_write_json(record_path, record)
    ctx.method = method
    return record


def evaluate_run(
    ctx: RunContext,
    indices: Optional[Sequence[int]] = None,
    out_csv: Optional[Path] = None,
    progress: bool = True,
) -> List[float]:
    """Evaluate the trained ``ctx.method`` on the run's episodes (or ``indices`` of them) into
    ``out_csv`` (default ``episodes.csv``), resuming from what is already there."""
    if ctx.method is None:
        raise RuntimeError("evaluate_run needs a trained method: call train(ctx) first")
    return evaluate(ctx.method, ctx.store, ctx.episodes, ctx.n_episodes, ctx.device, ctx.cfg.image_size,
                    Path(out_csv or ctx.episodes_csv), seed=ctx.cfg.seed, progress=progress,
                    indices=list(indices) if indices is not None else None)


# ----------------------------------------------------------------------------- episode CSVs
def missing_episodes(ctx: RunContext) -> List[int]:
    """Indices of episodes without a finished row in ``episodes.csv``."""
    done = read_episode_results(ctx.episodes_csv)
    return [i for i in range(ctx.n_episodes) if i not in done]


def merge_episode_rows(csv_path: Path, rows: Iterable[Dict[str, Any]]) -> None:
    """Add ``rows`` (``evaluation.FIELDS`` dicts) to an episodes CSV, keeping one row per episode
    in episode order; rewritten atomically (temp file, fsync, rename)."""
    csv_path = Path(csv_path)
    merged = {int(k): {f: str(v[f]) for f in FIELDS} for k, v in read_episode_results(csv_path).items()}
    for r in rows:
        merged.setdefault(int(r["episode"]), {f: str(r[f]) for f in FIELDS})
    def write(f) -> None:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for k in sorted(merged):
            w.writerow(merged[k])

    atomic_write(csv_path, write)


def salvage_shards(ctx: RunContext) -> int:
    """Merge rows left in ``shards/*.csv`` by interrupted shard tasks into ``episodes.csv``."""
    shard_dir = ctx.run_dir / "shards"
    if not shard_dir.is_dir():
        return 0
    rows: List[Dict[str, str]] = []
    files = sorted(shard_dir.glob("*.csv"))
    for f in files:
        rows += list(read_episode_results(f).values())
    if rows:
        merge_episode_rows(ctx.episodes_csv, rows)
    for f in files:
        f.unlink()
    try:
        shard_dir.rmdir()
    except OSError:
        pass
    return len(rows)


# ----------------------------------------------------------------------------- summaries
def run_summary_path(cfg: RunConfig, identity: Optional[RunIdentity] = None) -> Path:
    return run_dir_of(cfg, identity) / "summary.json"


def is_complete(cfg: RunConfig, identity: RunIdentity, n_episodes: int) -> Optional[Dict[str, Any]]:
    """The run's summary if it finished under exactly this identity, else None."""
    s = _read_json(run_summary_path(cfg, identity))
    if not s:
        return None
    ok = (s.get("identity") == identity.to_dict()
          and int(s.get("episodes", 0)) + int(s.get("episodes_failed", 0)) == n_episodes)
    return s if ok else None


def finish(ctx: RunContext, executor: str = "local", eval_peak_mb: Optional[float] = None,
           threads: Optional[int] = None, resumed: bool = False) -> Dict[str, Any]:
    """Summarise a fully evaluated run into ``summary.json`` (atomically) and return it."""
    cfg, store, episodes = ctx.cfg, ctx.store, ctx.episodes
    rows = read_episode_results(ctx.episodes_csv)
    missing = [i for i in range(ctx.n_episodes) if i not in rows]
    if missing:
        raise RuntimeError(f"run {ctx.run_dir.name} is missing episodes {missing[:5]}...; evaluate them first")
    # canonical file: exactly one row per episode, in episode order (as an uninterrupted local run writes)
    with ctx.episodes_csv.open(newline="") as f:
        order = [r.get("episode") for r in csv.DictReader(f)]
    if order != [str(i) for i in range(ctx.n_episodes)]:
        merge_episode_rows(ctx.episodes_csv, [])
    accs = [float(rows[i]["accuracy"]) if rows[i]["status"] == "ok" else math.nan for i in range(ctx.n_episodes)]
    eval_time = sum(float(rows[i]["seconds"]) for i in range(ctx.n_episodes))
    s = summarize(accs)
    record = _read_json(ctx.run_dir / "train.json") or {}
    train_time = record.get("train_time_s")
    peaks = [v for v in (record.get("peak_memory_mb"), eval_peak_mb) if v is not None]
    episode_list = _display_path(Path(episodes.path), Path(cfg.results_dir))  # type: ignore[attr-defined]
    pv, pc = paper_value(cfg.method, cfg.backbone, cfg.ways, cfg.shots)
    comparable = paper_comparable(store.name, cfg.profile, cfg.image_size, episodes.split)[0] and pv is not None
    summary: Dict[str, Any] = {
        "dataset": store.name, "method": cfg.method, "backbone": cfg.backbone, "ways": cfg.ways,
        "shots": cfg.shots, "split": episodes.split, "profile": cfg.profile, "seed": cfg.seed,
        "accuracy": round(s.mean, 4), "ci95": round(s.ci95, 4), "ci95_t": round(s.ci95_t, 4), "std": round(s.std, 4),
        "episodes": s.n, "episodes_failed": int(sum(a != a for a in accs)),
        "paper_value": pv, "paper_ci": pc, "paper_comparable": comparable, "image_size": cfg.image_size, "synthetic": store.synthetic,
        "episode_list": episode_list, "episode_hash": episodes.sha256, "dataset_fingerprint": store.fingerprint(),
        "config_hash": cell_config_hash(cfg), "run_config_hash": config_hash(cfg), "code_hash": ctx.identity.code_hash,
        "identity": ctx.identity.to_dict(),
        "params": record.get("params"), "train_time_s": train_time, "eval_time_s": round(eval_time, 2),
        "wall_time_s": round((train_time or 0.0) + eval_time, 2),
        "peak_memory_mb": round(max(peaks), 1) if peaks else None,
        "device": str(ctx.device), "device_name": device_name(ctx.device),
        "threads": threads or torch.get_num_threads(), "executor": executor,
        "pretrain_world_size": record.get("pretrain_world_size", 1), "resumed": bool(record.get("resumed", False)) or resumed,
        "torch_version": torch.__version__, "python_version": platform.python_version(), **git_info(),
        "run_id": ctx.run_dir.name, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "training": record.get("training", {}),
    }
    atomic_write_json(ctx.run_dir / "summary.json", summary)
    return summary


def execute(cfg: RunConfig, store: Optional[ImageStore] = None, episodes: Optional[EpisodeList] = None,
            progress: bool = True, log=print, threads: Optional[int] = None) -> Dict[str, Any]:
    """Run (or resume) one (cell, seed) in this process: prepare, train, evaluate, finish.

    Returns:
        The run's summary (also written to ``summary.json``).
    """
    ctx = prepare(cfg, store, episodes, log)
    log(f"run {ctx.run_dir.name} on {ctx.device} ({ctx.store.name}{', synthetic' if ctx.store.synthetic else ''}; "
        f"{ctx.n_episodes} episodes of {Path(ctx.episodes.path).name}, hash {ctx.episodes.sha256})")  # type: ignore[attr-defined]
    salvage_shards(ctx)
    resumed = len(missing_episodes(ctx)) < ctx.n_episodes
    train(ctx, progress, log)
    reset_peak_memory(ctx.device)
    evaluate_run(ctx, progress=progress)
    return finish(ctx, "local", eval_peak_mb=peak_memory_mb(ctx.device), threads=threads, resumed=resumed)


# ----------------------------------------------------------------------------- leaderboard rows
def episode_accuracies(run_dir: Path, n: Optional[int] = None) -> np.ndarray:
    """Per-episode accuracies (%) of a run, in episode order (NaN for failed or missing episodes)."""
    rows = read_episode_results(Path(run_dir) / "episodes.csv")
    n = n if n is not None else (max(rows) + 1 if rows else 0)
    out = np.full(n, np.nan)
    for i, r in rows.items():
        if i < n and r.get("status") == "ok":
            out[i] = float(r["accuracy"])
    return out


#: Per-run fields that are the same for every seed of a cell (taken from the first).
_SHARED = ("dataset", "method", "backbone", "ways", "shots", "split", "profile", "paper_value", "paper_ci", "paper_comparable", "image_size",
           "synthetic", "episode_list", "episode_hash", "dataset_fingerprint", "config_hash", "code_hash", "params", "device",
           "device_name", "threads", "executor", "pretrain_world_size", "torch_version", "python_version")


def aggregate(summaries: Sequence[Dict[str, Any]], results_dir: Path) -> Dict[str, Any]:
    """The leaderboard row of a cell from the summaries of its seeds.

    ``accuracy`` is the mean of the per-seed means; ``ci95``/``ci95_t``/``std`` are the episode
    statistics of the per-episode accuracies averaged over seeds (one value per test episode, so
    ``n`` is the number of episodes, and with one seed they are that seed's statistics);
    ``seed_std`` is the sample standard deviation of the per-seed means (empty for one seed).
    Times add up over seeds, peak memory is the maximum.
    """
    if not summaries:
        raise ValueError("aggregate needs at least one run summary")
    summaries = sorted(summaries, key=lambda s: int(s["seed"]))
    n = int(summaries[0]["episodes"]) + int(summaries[0]["episodes_failed"])
    mat = np.stack([episode_accuracies(Path(results_dir) / "runs" / s["run_id"], n) for s in summaries])
    per_episode = mat.mean(axis=0)  # NaN where any seed failed the episode
    ep = summarize(per_episode)
    seed_means = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in mat])
    row: Dict[str, Any] = {k: summaries[0].get(k) for k in _SHARED}

    def total(key: str) -> Optional[float]:
        vals = [s.get(key) for s in summaries]
        return None if any(v is None for v in vals) else round(float(sum(vals)), 2)

    row.update({
        "accuracy": round(float(np.nanmean(seed_means)), 4),
        "ci95": round(ep.ci95, 4), "ci95_t": round(ep.ci95_t, 4), "std": round(ep.std, 4),
        "seed_std": round(float(np.std(seed_means, ddof=1)), 4) if len(summaries) > 1 else None,
        "n_seeds": len(summaries), "episodes": ep.n,
        "episodes_failed": int(sum(int(s["episodes_failed"]) for s in summaries)),
        "seeds": ",".join(str(s["seed"]) for s in summaries),
        "train_time_s": total("train_time_s"), "eval_time_s": total("eval_time_s"), "wall_time_s": total("wall_time_s"),
        "peak_memory_mb": max((s["peak_memory_mb"] for s in summaries if s.get("peak_memory_mb") is not None), default=None),
        "resumed": any(bool(s.get("resumed")) for s in summaries),
        # package version of every seed's run; the git commit only for runs made from a checkout
        "version": ";".join(dict.fromkeys(str(s.get("version") or "unknown") for s in summaries)),
        "git_commit": ";".join(dict.fromkeys(str(s["git_commit"]) for s in summaries if s.get("git_commit"))) or None,
        "git_dirty": any(bool(s.get("git_dirty")) for s in summaries) if any(s.get("git_commit") for s in summaries) else None,
        "run_id": ";".join(s["run_id"] for s in summaries),
        "finished_at": max(str(s["finished_at"]) for s in summaries),
    })
    if len({s.get("executor") for s in summaries}) > 1:
        row["executor"] = "mixed"
    return row


def publish(rows: Sequence[Dict[str, Any]], results_dir: Path, reference: Optional[str] = None) -> None:
    """Upsert leaderboard rows (under the leaderboard lock) and re-render the reports."""
    results_dir = Path(results_dir)
    for row in rows:
        upsert_row(results_dir / "leaderboard.csv", row, reference=reference)
    render_reports(results_dir)


def run(cfg: RunConfig, progress: bool = True, log=print, reference: Optional[str] = None) -> Dict[str, Any]:
    """Run (or resume) one cell with the config's seed and upsert its leaderboard row.

    Returns:
        The leaderboard row (dict).
    """
    summary = execute(cfg, progress=progress, log=log)
    row = aggregate([summary], cfg.results_dir)
    publish([row], Path(cfg.results_dir), reference)
    return row
