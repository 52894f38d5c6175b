"""Data time / step time of base-class pretraining and of a test evaluation, input pipeline off vs on (issue 27).

* ``pretraining``: :func:`fewshot_nsl.training.pretrain` of a CNN-4 (32 filters, ``nearest_neighbor``'s
  pretraining module) on a memory-mapped synthetic store (64 base classes x 60 images, 84x84), batch 64,
  augmentation on (crop + jitter), ``--steps`` optimiser steps: a slice of one epoch (a Mini-ImageNet epoch
  is 600 such steps; the share does not depend on the slice's length beyond its first batch);
* ``evaluation``: :func:`fewshot_nsl.evaluation.evaluate` of ProtoNet (CNN-4, 32 filters, untrained) on the
  first ``--episodes`` episodes of a 5-way 5-shot 15-query list of a memory-mapped synthetic test split
  (20 classes x 100 images, 84x84): a slice of a 600-episode evaluation; the share is a per-episode
  ratio, so it is what a 600-episode run gives (extrapolated, not measured on 600).

Data time = wall time the training or evaluation loop spends getting its next batch or episode (inside
the input pipeline's ``next()``: gathering from the store, conversion, normalisation, augmentation when
prefetching is off; waiting for the worker thread when it is on). Step time = wall time of the whole
call / steps (episodes). The loop thread's CPU time inside ``next()`` is printed too: on a machine loaded by
other processes the wall-clock data time of the ``on`` mode is mostly the wait for a core (or for the GIL)
after waking the worker, not work. ``off``: ``FEWSHOT_NSL_PREFETCH=0`` (everything in the loop's thread, as before
the pipeline overlapped); ``on``: the default (the next item prepared in a background thread). Both run in
one process, alternately, ``--reps`` times each; figures are medians [min-max].

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_input_pipeline.py [--steps 50] [--episodes 100] [--reps 1] [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, print_settings, verdict  # noqa: E402

from fewshot_nsl.data import prefetch  # noqa: E402
from fewshot_nsl.data.store import ImageStore  # noqa: E402

CPU = torch.device("cpu")


class DataClock:
    """Wall seconds (and the calling thread's CPU seconds) spent inside :class:`~fewshot_nsl.data.prefetch.Prefetcher`
    ``next()`` while active."""

    def __init__(self) -> None:
        self.seconds, self.cpu_seconds, self.calls = 0.0, 0.0, 0

    def __enter__(self) -> "DataClock":
        self._real = prefetch.Prefetcher.__next__
        clock = self

        def timed(it):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return clock._real(it)
            finally:
                clock.seconds += time.perf_counter() - t0
                clock.cpu_seconds += time.thread_time() - c0
                clock.calls += 1

        prefetch.Prefetcher.__next__ = timed  # this benchmark's instrumentation only, restored on exit
        return self

    def __exit__(self, *exc: object) -> None:
        prefetch.Prefetcher.__next__ = self._real


def memmap_store(directory: Path, classes: int, per_class: int, size: int, split: str) -> ImageStore:
    """A memory-mapped synthetic store of ``classes x per_class`` random ``size`` px images, all in ``split``
    (plus one val and one test class so configs resolve)."""
    path = directory / f"{split}_{classes}x{per_class}_{size}"
    if not ImageStore.is_cached(path):
        rng = np.random.default_rng(0)
        n = classes + 2
        images = rng.integers(0, 256, size=(n * per_class, size, size, 3), dtype=np.uint8)
        splits = [split] * classes + [s for s in ("train", "val", "test") if s != split][:2]
        ImageStore("bench", images, np.repeat(np.arange(n), per_class), [f"c{i:03d}" for i in range(n)], splits,
                   synthetic=True).save(path)
    return ImageStore.load(path)


def config(method: str, size: int, tmp: Path, **sections):
    from fewshot_nsl.config import resolve_config

    return resolve_config({"method": method, "profile": "smoke", "dataset": "glyphs", "image_size": size,
                           "device": "cpu", "cache_dir": str(tmp / "cache"), **sections})


def run_pretraining(store: ImageStore, size: int, steps: int, tmp: Path, tag: str) -> Dict[str, float]:
    from fewshot_nsl.runner import build_method, conv_spec_of
    from fewshot_nsl.training import pretrain, set_seed

    cfg = config("nearest_neighbor", size, tmp, pretrain={"epochs": 1, "batch_size": 64, "max_steps": steps,
                                                            "augment": True})
    set_seed(0)
    method = build_method(cfg)
    with DataClock() as clock:
        t0 = time.perf_counter()
        pretrain(method, store, cfg, CPU, conv_spec_of(cfg), tmp / f"cache_{tag}", progress=False)
        wall = time.perf_counter() - t0
    assert clock.calls >= steps
    return {"wall": wall, "data": clock.seconds, "data_cpu": clock.cpu_seconds, "per_step": wall / steps}


def run_evaluation(store: ImageStore, size: int, episodes: int, tmp: Path, tag: str) -> Dict[str, float]:
    from fewshot_nsl.data.episodes import episode_list_for_store
    from fewshot_nsl.evaluation import evaluate
    from fewshot_nsl.runner import build_method
    from fewshot_nsl.training import set_seed

    cfg = config("protonet", size, tmp)
    lst = episode_list_for_store(store, "test", 5, 5, 15, n=episodes, seed=0)
    set_seed(0)
    method = build_method(cfg)
    with DataClock() as clock:
        t0 = time.perf_counter()
        evaluate(method, store, lst, episodes, CPU, size, tmp / f"eval_{tag}.csv", progress=False,
                 batch_episodes=1)  # the per-episode path: its data time is what is measured
        wall = time.perf_counter() - t0
    assert clock.calls == episodes
    return {"wall": wall, "data": clock.seconds, "data_cpu": clock.cpu_seconds, "per_step": wall / episodes}


def alternate(run, reps: int) -> Dict[str, List[Dict[str, float]]]:
    """``run(tag)`` with prefetching off and on, alternately (the order flipped every repetition)."""
    out: Dict[str, List[Dict[str, float]]] = {"off": [], "on": []}
    saved = os.environ.get(prefetch.ENV_SWITCH)
    try:
        for r in range(reps):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                os.environ[prefetch.ENV_SWITCH] = "1" if mode == "on" else "0"
                out[mode].append(run(f"{mode}{r}"))
    finally:
        if saved is None:
            os.environ.pop(prefetch.ENV_SWITCH, None)
        else:
            os.environ[prefetch.ENV_SWITCH] = saved
    return out


def med(values: List[float]) -> str:
    return f"{statistics.median(values):.4g} [{min(values):.4g}-{max(values):.4g}]"


def report(title: str, unit: str, runs: Dict[str, List[Dict[str, float]]], goal: str) -> None:
    print(f"\n-- {title}")
    shares = {}
    for mode in ("off", "on"):
        rs = runs[mode]
        shares[mode] = [r["data"] / r["wall"] for r in rs]
        n = [r["wall"] / r["per_step"] for r in rs]
        print(f"   prefetch {mode:3s}: {1e3 * statistics.median(r['per_step'] for r in rs):8.1f} ms per {unit}, "
              f"data {1e3 * statistics.median(r['data'] / k for r, k in zip(rs, n)):7.2f} ms per {unit} "
              f"(loop thread's CPU time in it {1e3 * statistics.median(r['data_cpu'] / k for r, k in zip(rs, n)):.2f} ms), "
              f"data share {med([100 * s for s in shares[mode]])} %")
    on = statistics.median(shares["on"])
    met = verdict(on, 0.05, "<=")
    speed = statistics.median(r["per_step"] for r in runs["off"]) / statistics.median(r["per_step"] for r in runs["on"])
    print(f"   data time / step time with prefetch: {100 * on:.2f}% (off: {100 * statistics.median(shares['off']):.2f}%)"
          f"   target <= 5%: {met};   step time off / on: x{speed:.3f}")
    emit("27.4", f"data share of {goal}, prefetch on", {"median": on, "min": min(shares["on"]), "max": max(shares["on"])},
         "<= 5%", met, off_share=statistics.median(shares["off"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50, help="pretraining steps (batch 64) per run")
    p.add_argument("--episodes", type=int, default=100, help="evaluation episodes per run")
    p.add_argument("--size", type=int, default=84)
    p.add_argument("--reps", type=int, default=1, help="runs of each mode (off/on alternate)")
    p.add_argument("--only", default="pretrain,eval", help="pretrain, eval or both")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = p.parse_args(argv)
    classes, per_class, test_per_class = 64, 60, 100
    if args.quick:
        args.steps, args.episodes, args.size = 3, 6, 32
        classes, per_class, test_per_class = 8, 30, 20
    print_settings("bench_input_pipeline: issue 27 item 4, data time / step time", size=args.size)
    with tempfile.TemporaryDirectory(prefix="fewshot_bench_pipeline_") as d:
        tmp = Path(d)
        if "pretrain" in args.only:
            store = memmap_store(tmp, classes, per_class, args.size, "train")
            runs = alternate(lambda tag: run_pretraining(store, args.size, args.steps, tmp, tag), args.reps)
            report(f"pretraining: CNN-4 (32), batch 64, augmentation, {args.size}x{args.size}, {args.steps} steps "
                   f"(slice of an epoch)", "step", runs, "a pretraining epoch")
        if "eval" in args.only:
            store = memmap_store(tmp, 20, test_per_class, args.size, "test")
            runs = alternate(lambda tag: run_evaluation(store, args.size, args.episodes, tmp, tag), args.reps)
            report(f"evaluation: ProtoNet CNN-4 (32), 5-way 5-shot 15-query, {args.size}x{args.size}, {args.episodes} "
                   f"episodes (slice of a 600-episode evaluation; the share is per episode)", "episode", runs,
                   "a 600-episode evaluation")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
