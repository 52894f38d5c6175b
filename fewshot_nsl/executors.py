"""Where runs execute: in this process (:class:`LocalExecutor`) or as Ray tasks (:class:`RayExecutor`).

An executor takes :class:`fewshot_nsl.grid.RunJob` s (one per (cell, seed)) and calls
``on_done(job, summary)`` when a run has finished (its ``summary.json`` written) or
``on_error(job, exception)`` when it failed.

**Ray.** Every piece of work is a Ray task, scheduled by Ray (no scheduler of our own):

* one *pretrain* task per distinct pretraining (cache key) that is not cached yet, so methods
  sharing a pretrained backbone do not train it twice in parallel;
* one *train* task per run (episodic training and ``method.pt``), after its pretrain task;
* *eval* tasks over shards of the run's missing test episodes (``--shard-size`` episodes each),
  after its train task. Each evaluates its episode indices with
  :func:`fewshot_nsl.evaluation.evaluate` into ``runs/<id>/shards/<first>-<last>.csv`` (so an
  interrupted shard resumes) and returns its rows; the driver merges them into
  ``episodes.csv`` in episode order and writes the summary exactly as a local run does.

Every episode is seeded from ``(seed, episode index)``, so where an episode runs does not
change its result. What does: the number of intra-op threads torch uses on CPU (float
reductions are split differently). Both executors therefore run with the same ``threads``
(default: this process's ``torch.get_num_threads()``), each Ray task reserving that many CPUs;
with equal threads the Ray executor reproduces the local results bit for bit. The thread count
is recorded in every row (``threads``).

**GPUs.** Whether a task asks Ray for a GPU is decided from the cluster's resources
(``ray.cluster_resources()["GPU"]``) and the run's ``--device``, never from the driver's own CUDA (the driver
may run on a CPU-only head or login node): ``auto`` and ``cuda``/``cuda:N`` get one GPU per task where the
cluster has GPUs (``cuda`` on a cluster without any is one error before any task starts), ``cpu`` none. Ray then
shows each task only its GPU, so ``cuda:N`` runs on the GPU Ray assigned. A task that was given a GPU but whose
torch sees none (a CPU build of torch on that node, a broken driver) fails in one line instead of running on the
CPU.

Workers need the results and cache folders: on one machine they are shared; on a cluster put
``--results-dir`` and ``--cache-dir`` on a shared filesystem and install the suite on every node.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .errors import ConfigError

Callback = Callable[..., None]


def _silent(*_a: Any, **_k: Any) -> None:
    pass


class LocalExecutor:
    """Runs the jobs one after another in this process."""

    name = "local"

    def __init__(self, threads: Optional[int] = None) -> None:
        self.threads = threads

    def run(self, jobs: Sequence[Any], on_done: Callback, on_error: Callback, progress: bool = True, log=print) -> None:
        from .runner import execute

        if self.threads:
            torch.set_num_threads(self.threads)
        for job in jobs:
            try:
                summary = execute(job.cfg, job.store, job.episodes, progress=progress, log=log,
                                  threads=torch.get_num_threads())
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - reported per cell; the grid goes on
                on_error(job, exc)
                continue
            on_done(job, summary)


# ----------------------------------------------------------------------------- Ray
def import_ray():
    """Import Ray or raise a one-line error saying how to install it."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install -e '.[ray]' (or pip install 'ray>=2.9')") from None
    return ray


# Worker-side state (one per Ray worker process): stores are loaded once per worker.
_STORES: Dict[str, Any] = {}


def task_gpus(device: str, cluster_gpus: float) -> int:
    """GPUs one Ray task of a run with ``--device device`` asks for on a cluster with ``cluster_gpus`` GPUs.

    Raises:
        ConfigError: ``cuda``/``cuda:N`` on a cluster without a GPU.
    """
    if device == "cpu":
        return 0
    if cluster_gpus >= 1:
        return 1
    if device.startswith("cuda"):
        raise ConfigError(f"--device {device} was asked for but the Ray cluster has no GPU (ray.cluster_resources() "
                          f"lists {cluster_gpus:g}); start the Ray nodes on GPU machines, or use --device auto or cpu")
    return 0


def _check_gpu_visible(gpus: int) -> None:
    """In a worker: a task given ``gpus`` GPUs must see one, else one line rather than a silent CPU run."""
    if gpus and not torch.cuda.is_available():
        import socket

        raise ConfigError(
            f"this Ray task was given {gpus} GPU but torch on {socket.gethostname()} sees none "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda}); install a CUDA build of torch on the GPU nodes, or pass --device cpu")


def _worker_context(cfg, plugin_dirs: Sequence[str], threads: int, expect: Optional[str] = None, gpus: int = 0):
    """The run's context in a worker, on the worker's cached store.

    ``expect`` is the run folder name the driver prepared (its identity digest covers the dataset content): a
    store this worker decoded before the data changed on disk gives another identity, so it is dropped and the
    data read again; if the identity still differs, the task refuses in one line rather than evaluating other
    pixels under the driver's run. ``gpus``: the GPUs Ray gave the task (it must see them).
    """
    from .errors import DataError
    from .registry import load_plugins
    from .runner import load_store, prepare, run_dir_of, run_identity, store_key

    _check_gpu_visible(gpus)
    load_plugins([Path(d) for d in plugin_dirs])
    torch.set_num_threads(threads)
    key = store_key(cfg)
    if key in _STORES and expect is not None and run_dir_of(cfg, run_identity(cfg, _STORES[key])).name != expect:
        del _STORES[key]  # decoded before the data changed: read it again
    if key not in _STORES:
        if len(_STORES) >= 2:
            _STORES.clear()
        _STORES[key] = load_store(cfg)
    ctx = prepare(cfg, _STORES[key], log=_silent)
    if expect is not None and ctx.run_dir.name != expect:
        raise DataError(f"a worker sees run {ctx.run_dir.name} where the driver prepared {expect}: the data or code "
                        f"changed while the run was in flight; run the command again")
    return ctx


def pretrain_task(cfg, plugin_dirs: Sequence[str], threads: int, expect: Optional[str] = None,
                  gpus: int = 0) -> Dict[str, Any]:
    """Ray task: base-class pretraining into the shared cache (no-op when cached).

    The process is set up as :func:`fewshot_nsl.runner.train` sets it up
    (:func:`fewshot_nsl.process_setup.build_for_device`: seed, determinism and TF32 switches, channels-last,
    compile), so the cached weights do not depend on which entry point trained them, nor on what an earlier task
    left in this worker.
    """
    from . import training
    from .data.store import default_cache_dir
    from .process_setup import build_for_device
    from .runner import conv_spec_of

    ctx = _worker_context(cfg, plugin_dirs, threads, expect, gpus)
    t0 = time.perf_counter()
    built = build_for_device(cfg, ctx.device, log=_silent)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    info = training.pretrain(built.method, ctx.store, cfg, ctx.device, conv_spec_of(cfg), cache, progress=False,
                             compiled=built.compiled)
    return {**info, "time_s": round(time.perf_counter() - t0, 2)}


def train_task(cfg, plugin_dirs: Sequence[str], threads: int, after: Any = None,
               owns_pretrain: bool = False, expect: Optional[str] = None, gpus: int = 0) -> Dict[str, Any]:
    """Ray task: train (or load) the run's method; returns its ``train.json`` record.

    ``after`` is the result of the pretrain task this run waited for; the first run of those
    sharing it (``owns_pretrain``) counts its time and details, as the local executor does for the
    run that pretrains.
    """

    from .runner import train
    from .safe_io import atomic_write_json

    ctx = _worker_context(cfg, plugin_dirs, threads, expect, gpus)
    fresh = not (ctx.run_dir / "method.pt").is_file()
    record = train(ctx, progress=False, log=_silent)
    if fresh and owns_pretrain and isinstance(after, dict) and not after.get("cached"):
        record["train_time_s"] = round((record.get("train_time_s") or 0.0) + after["time_s"], 2)
        record.setdefault("training", {})["pretrain"] = {k: v for k, v in after.items() if k != "time_s"}
        atomic_write_json(ctx.run_dir / "train.json", record)
    return record


def eval_task(cfg, indices: List[int], plugin_dirs: Sequence[str], threads: int, after: Any = None,
              expect: Optional[str] = None, gpus: int = 0) -> Dict[str, Any]:
    """Ray task: evaluate episodes ``indices`` of a trained run into its own shard CSV.

    Returns:
        ``{"rows": [episode rows], "peak_memory_mb": float}``.
    """
    from .evaluation import read_episode_results
    from .runner import evaluate_run, peak_memory_mb, reset_peak_memory, train

    ctx = _worker_context(cfg, plugin_dirs, threads, expect, gpus)
    train(ctx, progress=False, log=_silent)  # loads method.pt (and the cached pretraining)
    reset_peak_memory(ctx.device)
    shard = ctx.run_dir / "shards" / f"{indices[0]:06d}-{indices[-1]:06d}.csv"
    evaluate_run(ctx, indices=indices, out_csv=shard, progress=False)
    done = read_episode_results(shard)
    return {"rows": [done[i] for i in indices], "peak_memory_mb": peak_memory_mb(ctx.device)}


def _absolute(cfg):
    """The config with its paths made absolute (workers may run elsewhere)."""
    from .data.store import default_cache_dir

    def ab(p: Optional[str]) -> Optional[str]:
        return str(Path(p).expanduser().resolve()) if p else p

    # Ray shows a task only the GPU it assigned (as device 0): `cuda:N` is that GPU, not the node's N-th
    device = "cuda" if cfg.device.startswith("cuda:") else cfg.device
    return dataclasses.replace(cfg, results_dir=ab(cfg.results_dir), cache_dir=ab(cfg.cache_dir or str(default_cache_dir())),
                               data_root=ab(cfg.data_root), episodes_file=ab(cfg.episodes_file), device=device)


class RayExecutor:
    """Runs pretraining, training and evaluation shards as Ray tasks.

    Args:
        address: ``None`` starts a local Ray cluster (stopped afterwards); ``"auto"`` or
            ``"ray://host:port"`` joins an existing one.
        num_cpus: CPUs of the local cluster (default: all).
        threads: torch intra-op threads per task (= CPUs it reserves); default: this process's.
        shard_size: test episodes per evaluation task.
        plugin_dirs: ``--plugins`` folders the workers must load too.
    """

    name = "ray"

    def __init__(self, address: Optional[str] = None, num_cpus: Optional[int] = None, threads: Optional[int] = None,
                 shard_size: int = 100, plugin_dirs: Sequence[str] = ()) -> None:
        if shard_size < 1:
            raise ConfigError(f"--shard-size must be at least 1, got {shard_size}")
        self.address, self.num_cpus, self.shard_size = address, num_cpus, shard_size
        self.threads = threads or torch.get_num_threads()
        self.plugin_dirs = [str(Path(d).resolve()) for d in plugin_dirs]
        import_ray()

    def _init(self, ray) -> bool:
        if ray.is_initialized():
            return False
        kwargs: Dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
        if self.address and self.address != "auto" and not self.address.startswith("ray://"):
            _check_reachable(self.address)  # Ray itself retries an unreachable GCS for minutes
        if self.address:
            kwargs["address"] = self.address
            cache = os.environ.get("FEWSHOT_NSL_CACHE")
            if cache:
                kwargs["runtime_env"] = {"env_vars": {"FEWSHOT_NSL_CACHE": cache}}
        else:
            kwargs["num_cpus"] = self.num_cpus or os.cpu_count() or 1
        try:
            ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            where = f"join the Ray cluster at {self.address}" if self.address else "start a local Ray cluster"
            raise ConfigError(f"could not {where} ({first}); check --ray-address, or start one with `ray start --head`") from None
        return True

    def run(self, jobs: Sequence[Any], on_done: Callback, on_error: Callback, progress: bool = True, log=print) -> None:
        from .data.store import default_cache_dir
        from .runner import (
            conv_spec_of,
            finish,
            merge_episode_rows,
            missing_episodes,
            prepare,
            salvage_shards,
            stages_of,
        )
        from .registry import get_method_class
        from .training import pretrain_cache_path

        ray = import_ray()
        started = self._init(ray)
        try:
            resources = ray.cluster_resources()
            cpus = int(resources.get("CPU", 1))
            cluster_gpus = float(resources.get("GPU", 0) or 0)
            task_cpus = max(1, min(self.threads, cpus))
            # decided from the cluster, not from this driver's CUDA: the driver may run on a CPU-only head node
            job_gpus = [task_gpus(j.cfg.device, cluster_gpus) for j in jobs]  # a `cuda` job without GPUs fails here
            remotes = {g: tuple(ray.remote(fn).options(num_cpus=task_cpus, num_gpus=g, max_retries=0)
                                for fn in (pretrain_task, train_task, eval_task)) for g in sorted(set(job_gpus))}
            t0 = time.perf_counter()
            log(f"ray: {len(jobs)} run(s) on a cluster with {cpus} CPU(s) and {cluster_gpus:g} GPU(s); {task_cpus} "
                f"CPU(s){' and 1 GPU' if any(job_gpus) else ''} and {self.threads} thread(s) per task, "
                f"{self.shard_size} episodes per evaluation task")

            pre_refs: Dict[str, Any] = {}
            state: Dict[int, Dict[str, Any]] = {}
            ref_owner: Dict[Any, int] = {}
            for k, job in enumerate(jobs):
                cfg = _absolute(job.cfg)
                gpus = job_gpus[k]
                r_pre, r_train, r_eval = remotes[gpus]
                # the driver only prepares folders and merges results: it needs no GPU (it may be a CPU-only head
                # node; the tasks run on the GPUs Ray gives them, and the row records where training ran)
                ctx = prepare(dataclasses.replace(cfg, device="cpu") if gpus else cfg, job.store, job.episodes,
                              log=log)  # its warnings (e.g. a changed record set aside) reach the user
                salvage_shards(ctx)
                missing = missing_episodes(ctx)
                st = {"job": job, "ctx": ctx, "pending": set(), "peak": [], "failed": False,
                      "resumed": len(missing) < ctx.n_episodes}
                state[k] = st
                dep, owns = None, False
                if not (ctx.run_dir / "method.pt").is_file():
                    if "pretrain" in stages_of(cfg):
                        cache = Path(cfg.cache_dir or default_cache_dir())
                        pre_path = pretrain_cache_path(cfg, job.store, conv_spec_of(cfg), get_method_class(cfg.method), cache)
                        key = pre_path.stem
                        if not pre_path.is_file():
                            owns = key not in pre_refs
                            if owns:
                                pre_refs[key] = r_pre.remote(cfg, self.plugin_dirs, self.threads, ctx.run_dir.name,
                                                             gpus)
                            dep = pre_refs[key]
                    dep = r_train.remote(cfg, self.plugin_dirs, self.threads, dep, owns, ctx.run_dir.name, gpus)
                    if not missing:
                        st["pending"].add(dep)
                        ref_owner[dep] = k
                for i in range(0, len(missing), self.shard_size):
                    ref = r_eval.remote(cfg, missing[i: i + self.shard_size], self.plugin_dirs, self.threads, dep,
                                        ctx.run_dir.name, gpus)
                    st["pending"].add(ref)
                    ref_owner[ref] = k
                if not st["pending"]:
                    self._finish(k, st, on_done, on_error, finish)
            outstanding = list(ref_owner)
            done_runs = 0
            while outstanding:
                ready, outstanding = ray.wait(outstanding, num_returns=1)
                ref = ready[0]
                k = ref_owner.pop(ref)
                st = state[k]
                st["pending"].discard(ref)
                if st["failed"]:
                    continue
                try:
                    out = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a task's error, reported per cell
                    st["failed"] = True
                    on_error(st["job"], _cause(exc))
                    continue
                if isinstance(out, dict) and "rows" in out:
                    merge_episode_rows(st["ctx"].episodes_csv, out["rows"])
                    st["peak"].append(out["peak_memory_mb"])
                if not st["pending"]:
                    self._finish(k, st, on_done, on_error, finish)
                    done_runs += 1
                    if progress:
                        log(f"ray: {done_runs}/{len(jobs)} run(s) finished ({time.perf_counter() - t0:.0f} s)")
        finally:
            if started:
                ray.shutdown()

    def _finish(self, k: int, st: Dict[str, Any], on_done: Callback, on_error: Callback, finish) -> None:
        from .runner import salvage_shards

        ctx = st["ctx"]
        try:
            salvage_shards(ctx)
            summary = finish(ctx, "ray", eval_peak_mb=max(st["peak"]) if st["peak"] else None, threads=self.threads,
                             resumed=st["resumed"])
        except Exception as exc:  # noqa: BLE001
            on_error(st["job"], exc)
            return
        on_done(st["job"], summary)


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A ``host:port`` Ray address must accept a TCP connection, else a one-line error."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as exc:
        raise ConfigError(f"no Ray cluster answers at --ray-address {address} ({exc}); start one with "
                          f"`ray start --head` or pass --ray-address auto on a cluster node") from None


def _cause(exc: BaseException) -> BaseException:
    """The user's exception inside a RayTaskError (so FewShotErrors keep their one-line message)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc
