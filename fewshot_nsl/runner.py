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
  with the same identity means "complete");
* ``parts.json``: one record per invocation that worked on the run (its training seconds, whether
  it finished training, how it ended), so a resumed run's ``train_time_s`` and ``wall_time_s`` add
  up its parts, and its row says it was resumed. A part killed with SIGKILL is not recorded
  (Ctrl-C and SIGTERM are).

The stages are separate functions so executors can place them: :func:`prepare`,
:func:`train`, :func:`evaluate_run` (optionally on a subset of episodes) and :func:`finish`.
:func:`execute` chains them in this process; :func:`aggregate` turns the summaries of a cell's
seeds (and its other finished seeds in ``runs/``) into its leaderboard row; :func:`run` does one cell with one seed, end to end.
Running the same thing again resumes: finished training and episodes are not redone.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from .compiling import compile_in_place
from .config import RunConfig, save_config
from .console import Heartbeat, RunStatus, progress_every_of
from .curves import write_curves, write_tensorboard_summary
from .data.episodes import (
    EpisodeList,
)
from .data.store import ImageStore, default_cache_dir
from .episode_log import (  # noqa: F401
    EPISODES_DIGEST,
    episode_accuracies,
    episodes_sha256,
    evidence_problem,
    merge_episode_rows,
    missing_episodes,
    salvage_shards,
    set_aside_unbacked_record,
)
from .errors import ConfigError, DataError
from .evaluation import episode_accuracy, evaluate, read_episode_results
from .host_memory import retain_freed_memory
from .identity import RunIdentity, run_code_hash
from .inputs import (  # noqa: F401  (re-exported)
    TRAINING_STAGES,
    build_method,
    conv_spec_of,
    check_episode_count,
    load_episodes,
    load_store,
    path_name,
    stages_of,
    store_key,
    validate_against_store,
)
from .leaderboard import aggregate, paper_comparable, paper_value, upsert_row
from .methods.base import FewShotMethod
from .precision import fast_mode_text
from .process_setup import build_for_device
from .validation import validation_list_hash
from .provenance import (  # noqa: F401
    _display_path,
    _read_json,
    device_name,
    git_info,
    peak_memory_mb,
    reset_peak_memory,
)
from .registry import BACKBONES, get_method_class
from .reporting import render_reports
from .safe_io import atomic_write_json, remove_stale_tmp
from .stats import summarize
from .training import (
    atomic_torch_save,
    base_features,
    cached_world_size,
    load_checkpoint,
    meta_train,
    pretrain,
    pretrain_cache_path,
    resolve_device,
)


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
    backbone_factory = BACKBONES.get(cfg.backbone) if cfg.backbone in BACKBONES else None  # a plugin backbone's code counts
    cfg_hash = config_hash(cfg)
    val = {s: validation_list_hash(cfg, store, s) for s in stages_of(cfg) if s in TRAINING_STAGES}
    val = {s: h for s, h in val.items() if h}
    if val:  # the validation lists a stage selects or stops on are part of what determines the numbers
        cfg_hash = hashlib.sha256(json.dumps([cfg_hash, val], sort_keys=True).encode()).hexdigest()[:16]
    return RunIdentity(config_hash=cfg_hash, dataset_fingerprint=store.fingerprint(),
                       episode_hash=episodes.sha256, split=episodes.split,
                       code_hash=run_code_hash(method_cls, backbone_factory), world_size=world)


def run_id(cfg: RunConfig, identity: Optional[RunIdentity] = None) -> str:
    """``<dataset>_<method>_<backbone>_<W>w<S>s[_<split>]_<profile>_seed<seed>_<identity digest[:8]>``
    (the split is named when it is not ``test``).

    Raises:
        ConfigError: a name that cannot be part of a folder name (:func:`~fewshot_nsl.inputs.path_name`),
            or a run id longer than a file name may be.
    """
    identity = identity or run_identity(cfg)
    names = {what: path_name(value, what) for what, value in (
        ("dataset", cfg.dataset), ("method", cfg.method), ("backbone", cfg.backbone), ("profile", cfg.profile),
        ("split", identity.split))}
    split = "" if names["split"] == "test" else f"_{names['split']}"
    rid = (f"{names['dataset']}_{names['method']}_{names['backbone']}_{int(cfg.ways)}w{int(cfg.shots)}s{split}_"
           f"{names['profile']}_seed{int(cfg.seed)}_{identity.digest()[:8]}")
    if len(rid.encode("utf-8")) > MAX_RUN_ID_BYTES:
        raise ConfigError(f"run folder name {rid[:40]}... is {len(rid.encode('utf-8'))} bytes, more than a file name "
                          f"may hold ({MAX_RUN_ID_BYTES}); use shorter method/backbone/dataset names")
    return rid


#: File names are at most 255 bytes on common file systems.
MAX_RUN_ID_BYTES = 255


def run_dir_of(cfg: RunConfig, identity: Optional[RunIdentity] = None) -> Path:
    """``<results_dir>/runs/<run_id>``, checked to be inside ``<results_dir>/runs/`` once both are
    resolved (so neither a name nor a symlinked run folder can lead a run to write elsewhere).

    Raises:
        ConfigError: one line, when the run folder would be outside ``<results_dir>/runs/``.
    """
    runs = Path(cfg.results_dir) / "runs"
    rdir = runs / run_id(cfg, identity)
    inside, real = runs.resolve(), rdir.resolve()
    if real.parent != inside or not real.is_relative_to(inside):
        raise ConfigError(f"run folder {rdir} resolves to {real}, outside the results folder's runs/ ({inside}); "
                          f"remove that link or pass another --results-dir")
    return rdir


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


def check_method_builds(cfg: RunConfig) -> None:
    """Build the method once on the ``meta`` device (no memory, no initialisation cost), so that an option its
    constructor refuses (a :class:`~fewshot_nsl.errors.FewShotError`, e.g. a feature map too small for
    RelationNet's unpadded relation convs) is one line before any run folder exists. Any other exception is left
    to the real build, which reports it with the run's context."""
    from .errors import FewShotError

    try:
        with torch.device("meta"):
            build_method(cfg)
    except FewShotError:
        raise
    except Exception:  # noqa: BLE001 - a constructor that cannot run on meta tensors: checked by the real build
        pass


def cell_config_hash(cfg: RunConfig) -> str:
    """Hash of the resolved config with the seed set to 0: the same for every seed of a cell
    (the seeds are recorded apart); equal to :func:`config_hash` for seed 0."""
    return config_hash(dataclasses.replace(cfg, seed=0))


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
    status: Optional[RunStatus] = None  # progress lines and resume notes (None: nothing said)

    @property
    def n_episodes(self) -> int:
        """Episodes evaluated: the first ``cfg.eval.episodes`` of the list (never more than it
        holds: :func:`~fewshot_nsl.inputs.check_episode_count`)."""
        return self.cfg.eval.episodes

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
    retain_freed_memory()  # freed tensor memory is reused, not faulted in again every step (host_memory.py)
    unknown_stage = set(stages_of(cfg)) - set(TRAINING_STAGES)
    if unknown_stage:
        raise ConfigError(f"method {cfg.method} declares unknown training stage(s) {sorted(unknown_stage)}")
    store = store if store is not None else load_store(cfg)
    if getattr(store, "decode_note", None) and not getattr(store, "decode_note_said", False):
        log(f"note: {store.decode_note}")  # which image modes were converted, once per store
        store.decode_note_said = True
    validate_against_store(cfg, store)
    episodes = episodes if episodes is not None else load_episodes(cfg, store)
    check_episode_count(cfg, episodes)
    identity = run_identity(cfg, store, episodes)
    check_method_builds(cfg)
    rdir = run_dir_of(cfg, identity)
    claim_run_dir(rdir, identity)
    remove_stale_tmp(rdir)  # left by a process killed mid-write
    set_aside_unbacked_record(rdir, log)  # a summary its episodes.csv no longer backs: evaluated again, files kept
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
    # Set up right before the model is built (so the initial weights do not depend on whether the dataset was
    # generated or loaded from its cache in this process), as every entry point that trains does: cuda:N as the
    # current device, seed, CUDA fast mode unless --deterministic, channels-last, compile (process_setup.py).
    built = build_for_device(cfg, device, log=log)
    method, fast, compiled = built.method, built.fast, built.compiled
    info: Dict[str, Any] = {}
    curve: List[Dict[str, Any]] = []  # training-curve rows of every stage (fewshot_nsl.curves)
    trained = ctx.run_dir / "method.pt"
    stages = stages_of(cfg)
    if "pretrain" in stages:
        cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        pre = pretrain(method, ctx.store, cfg, device, conv_spec_of(cfg), cache, progress, curve=curve, compiled=compiled,
                       status=ctx.status)
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
        how = info["pretrain"].get("trained_with") or {}
        if info["pretrain"]["cached"] and how.get("fast_mode") != fast_mode_text(fast):
            # the cache key leaves the fast mode out (it changes rounding, not the experiment): say it, the row records it
            log(f"note: the cached pretraining was trained with fast mode {how.get('fast_mode')}, this run runs with "
                f"{fast_mode_text(fast)} (recorded as pretrain_fast_mode)")
        if type(method).fit_base is not FewShotMethod.fit_base:  # a method that uses the base classes
            features, labels = base_features(method.pretrain_module(), ctx.store, cfg, device, cache / cache_file)
            method.fit_base(features, labels)
        method.after_pretrain()
        method.to(device)
    if compiled:
        compile_in_place(method.backbone, warn=log)  # episodic training and evaluation; state dict names unchanged
    record_path = ctx.run_dir / "train.json"
    fresh = not trained.is_file()
    record = None if fresh else _read_json(record_path)
    if fresh:
        if "episodic" in stages:
            info["episodic"] = meta_train(method, ctx.store, cfg, device, ctx.run_dir / "checkpoint.pt", progress,
                                          curve=curve, status=ctx.status)
        write_curves(ctx.run_dir, curve, title=ctx.run_dir.name)  # training_curve.csv, training_curves.png
        atomic_torch_save(method.state_dict(), trained)
    else:
        method.load_state_dict(load_checkpoint(trained, device))
    if record is None:  # trained now (or killed between method.pt and train.json)
        # the training seconds of earlier parts that did not finish training (parts.json) add to this one's
        earlier = [p for p in read_parts(ctx.run_dir) if not p.get("trained")]
        before = sum(float(p.get("train_s") or 0.0) for p in earlier)
        resumed = bool(info.get("episodic", {}).get("resumed_from", 0)) or bool(earlier)
        record = {
            "train_time_s": round(before + (time.perf_counter() - t0 if fresh else 0.0), 2) if fresh or earlier else None,
            "params": int(sum(p.numel() for p in method.parameters())),
            "peak_memory_mb": round(peak_memory_mb(device), 1),
            "pretrain_world_size": int(info.get("pretrain", {}).get("world_size", 1)),
            "resumed": resumed,
            "compiled": compiled,
            # where training ran: with Ray, a worker's GPU, not the driver's device (finish reads it from here)
            "device": str(device), "device_name": device_name(device),
            "fast_mode": fast_mode_text(fast),
            "pretrain_fast_mode": (info.get("pretrain", {}).get("trained_with") or {}).get("fast_mode"),
            "host_malloc": retain_freed_memory(),
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
    log=None,
) -> List[float]:
    """Evaluate the trained ``ctx.method`` on the run's episodes (or ``indices`` of them) into
    ``out_csv`` (default ``episodes.csv``), resuming from what is already there; ``log`` gets the evaluation's
    ``warning:`` lines (default: stderr)."""
    if ctx.method is None:
        raise RuntimeError("evaluate_run needs a trained method: call train(ctx) first")
    info: Dict[str, Any] = {}
    accs = evaluate(ctx.method, ctx.store, ctx.episodes, ctx.n_episodes, ctx.device, ctx.cfg.image_size,
                    Path(out_csv or ctx.episodes_csv), seed=ctx.cfg.seed, progress=progress,
                    indices=list(indices) if indices is not None else None, error_dir=ctx.run_dir,
                    precision=ctx.cfg.precision, batch_episodes=ctx.cfg.eval.batch_episodes, info=info, log=log)
    if out_csv is None and indices is None:  # how the run's own evaluation ran (summary.json: eval_batch_episodes)
        atomic_write_json(ctx.run_dir / "evaluation.json", info)
    return accs


# ----------------------------------------------------------------------------- parts of a resumed run
PARTS_NAME = "parts.json"


def read_parts(run_dir: Path) -> List[Dict[str, Any]]:
    """The records of the earlier invocations that worked on the run (``parts.json``; [] when none)."""
    data = _read_json(Path(run_dir) / PARTS_NAME)
    parts = data.get("parts") if isinstance(data, dict) else None
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


def add_part(run_dir: Path, part: Dict[str, Any]) -> None:
    """Append one invocation's record to ``parts.json`` (atomically)."""
    atomic_write_json(Path(run_dir) / PARTS_NAME, {"parts": read_parts(run_dir) + [part]})


def resume_line(ctx: RunContext, earlier: Sequence[Dict[str, Any]], episodes_done: int) -> Optional[str]:
    """``resuming run <id> (part 2): ...`` saying where a run that was started before goes on from, or None
    for a run that starts afresh."""
    trained = (ctx.run_dir / "method.pt").is_file()
    checkpoint = (ctx.run_dir / "checkpoint.pt").is_file()
    if not (earlier or trained or checkpoint or episodes_done):
        return None
    if trained:
        where = "training finished (method.pt)"
    elif checkpoint:
        where = "episodic training goes on from its checkpoint"
    elif "pretrain" in stages_of(ctx.cfg):
        where = "training starts again (pretraining goes on from its last finished epoch where one was saved)"
    else:
        where = "training starts again (no checkpoint was saved)"
    return (f"resuming run {ctx.run_dir.name} (part {len(earlier) + 1}): {where}; {episodes_done} of "
            f"{ctx.n_episodes} test episodes already done")


# ----------------------------------------------------------------------------- summaries
def run_summary_path(cfg: RunConfig, identity: Optional[RunIdentity] = None) -> Path:
    return run_dir_of(cfg, identity) / "summary.json"


def is_complete(cfg: RunConfig, identity: RunIdentity, n_episodes: int) -> Optional[Dict[str, Any]]:
    """The run's summary if it finished under exactly this identity on ``n_episodes`` episodes
    (``episodes`` counts every evaluated episode, failed ones included), else None."""
    s = _read_json(run_summary_path(cfg, identity))
    if not isinstance(s, dict):
        return None
    ok = s.get("identity") == identity.to_dict() and int(s.get("episodes", -1)) == n_episodes
    # a summary whose episodes.csv no longer backs it is not a finished run: the run evaluates again (prepare)
    return s if ok and evidence_problem(run_summary_path(cfg, identity).parent, s) is None else None


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
    digest = episodes_sha256(ctx.episodes_csv)  # the row's evidence: any later change of the file is detected
    # a failed (non-finite) episode counts as wrong: a method cannot raise its mean by abstaining
    failed = {i for i in range(ctx.n_episodes) if rows[i]["status"] != "ok"}
    accs = [episode_accuracy(rows[i]) for i in range(ctx.n_episodes)]
    eval_time = sum(float(rows[i]["seconds"]) for i in range(ctx.n_episodes))
    s = summarize(accs)
    record = _read_json(ctx.run_dir / "train.json") or {}
    evaluation = _read_json(ctx.run_dir / "evaluation.json") or {}  # how the evaluation ran (evaluate_run)
    train_time = record.get("train_time_s")
    parts = read_parts(ctx.run_dir)
    peaks = [v for v in (record.get("peak_memory_mb"), eval_peak_mb) if v is not None]
    episode_list = _display_path(Path(episodes.path), Path(cfg.results_dir))  # type: ignore[attr-defined]
    pv, pc = paper_value(cfg.method, cfg.backbone, cfg.ways, cfg.shots)
    comparable = paper_comparable(store.name, cfg.profile, cfg.image_size, episodes.split)[0] and pv is not None
    summary: Dict[str, Any] = {
        "dataset": store.name, "method": cfg.method, "backbone": cfg.backbone, "ways": cfg.ways,
        "shots": cfg.shots, "split": episodes.split, "profile": cfg.profile, "seed": cfg.seed,
        "accuracy": round(s.mean, 4), "ci95": round(s.ci95, 4), "ci95_t": round(s.ci95_t, 4), "std": round(s.std, 4),
        "episodes": s.n, "episodes_failed": len(failed),
        "paper_value": pv, "paper_ci": pc, "paper_comparable": comparable, "image_size": cfg.image_size, "synthetic": store.synthetic,
        "episode_list": episode_list, "episode_hash": episodes.sha256, EPISODES_DIGEST: digest,
        "dataset_fingerprint": store.fingerprint(),
        "config_hash": cell_config_hash(cfg), "run_config_hash": config_hash(cfg), "code_hash": ctx.identity.code_hash,
        "identity": ctx.identity.to_dict(),
        "params": record.get("params"), "train_time_s": train_time, "eval_time_s": round(eval_time, 2),
        "wall_time_s": round((train_time or 0.0) + eval_time, 2),
        "peak_memory_mb": round(max(peaks), 1) if peaks else None,
        "device": record.get("device") or str(ctx.device),
        "device_name": record.get("device_name") or device_name(ctx.device),
        "threads": threads or torch.get_num_threads(), "executor": executor,
        "compiled": bool(record.get("compiled", False)), "precision": cfg.precision,
        "transductive": get_method_class(cfg.method).is_transductive(cfg.method_options),
        "fast_mode": record.get("fast_mode", "off"), "pretrain_fast_mode": record.get("pretrain_fast_mode"),
        "eval_batch_episodes": evaluation.get("batch_episodes"),
        "eval_batched_fallback": evaluation.get("batched_fallback"),
        "pretrain_world_size": record.get("pretrain_world_size", 1), "resumed": bool(record.get("resumed", False)) or resumed or len(parts) > 1,
        "parts": max(len(parts), 1),
        "torch_version": torch.__version__, "python_version": platform.python_version(), **git_info(),
        "run_id": ctx.run_dir.name, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "training": record.get("training", {}),
    }
    atomic_write_json(ctx.run_dir / "summary.json", summary)
    write_tensorboard_summary(ctx.run_dir, cfg, summary)  # the evaluation accuracy and the hparams (optional extra)
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
    done = ctx.n_episodes - len(missing_episodes(ctx))
    earlier = read_parts(ctx.run_dir)
    line = resume_line(ctx, earlier, done)
    if line:
        log(line)
    resumed = line is not None
    ctx.status = RunStatus(f"{cfg.method} {cfg.backbone} {cfg.ways}w{cfg.shots}s seed {cfg.seed}", log)
    part: Dict[str, Any] = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "train_s": 0.0,
                            "trained": False, "outcome": "interrupted"}
    with Heartbeat(ctx.status, progress_every_of(progress), log):
        try:
            t0 = time.perf_counter()
            try:
                train(ctx, progress, log)
                part["trained"] = True
            finally:
                part["train_s"] = round(time.perf_counter() - t0, 2)
            reset_peak_memory(ctx.device)
            ctx.status.begin("evaluate", ctx.n_episodes, done, unit="episode", poll=lambda: _evaluated(ctx))
            evaluate_run(ctx, progress=progress, log=log)
            part["outcome"] = "finished"
        except Exception:
            part["outcome"] = "failed"
            raise
        finally:
            # a part that failed before doing any work (e.g. a refused checkpoint) leaves the run folder as it was
            if part["outcome"] != "failed" or part["trained"] or _evaluated(ctx)[0] > done:
                try:
                    add_part(ctx.run_dir, part)
                except OSError:
                    if part["outcome"] != "failed":
                        raise
                    # the part failed already (e.g. on a full disk): its own error is the one to report
    return finish(ctx, "local", eval_peak_mb=peak_memory_mb(ctx.device), threads=threads, resumed=resumed)


def _evaluated(ctx: RunContext) -> tuple:
    """``(episodes finished, their mean accuracy in %)`` from the run's ``episodes.csv`` (progress lines)."""
    from .evaluation import read_episode_results

    rows = [r for i, r in read_episode_results(ctx.episodes_csv).items() if i < ctx.n_episodes]
    accs = [episode_accuracy(r) for r in rows]
    return len(rows), (sum(accs) / len(accs) if accs else None)


def publish(rows: Sequence[Dict[str, Any]], results_dir: Path, reference: Optional[str] = None,
            replace: bool = False, log=print) -> None:
    """Upsert leaderboard rows (under the leaderboard lock; a row with less evidence than the one
    there is kept out unless ``replace``, and ``log`` says so) and re-render the reports."""
    results_dir = Path(results_dir)
    for row in rows:
        upsert_row(results_dir / "leaderboard.csv", row, reference=reference, replace=replace, log=log)
    render_reports(results_dir, log=log)


def run(cfg: RunConfig, progress: bool = True, log=print, reference: Optional[str] = None,
        replace: bool = False) -> Dict[str, Any]:
    """Run (or resume) one cell with the config's seed and upsert its leaderboard row, which
    aggregates the cell's other finished seeds too (:func:`~fewshot_nsl.leaderboard.cell_summaries`).

    Args:
        replace: replace the cell's leaderboard row even if it was measured on more episodes or seeds.

    Returns:
        The cell's row from this run (dict); the leaderboard keeps the row with more evidence.
    """
    summary = execute(cfg, progress=progress, log=log)
    row = aggregate([summary], cfg.results_dir)
    publish([row], Path(cfg.results_dir), reference, replace=replace, log=log)
    return row
