"""Target 5 (harness overhead): ProtoNet evaluation throughput vs a bare forward loop over the same tensors.

* ``harness``: :func:`fewshot_nsl.evaluation.evaluate` of ProtoNet (CNN-4, 32 filters) on ``N``
  episodes of a memory-mapped synthetic store (a fresh results CSV each time, progress bar off),
  i.e. everything the harness does: materialising, re-seeding, ``fit_support`` + ``forward`` under
  ``no_grad``, the finiteness check, accuracy, and the per-episode CSV row;
* ``bare``: the same backbone on the same episodes' tensors, materialised beforehand:
  ``backbone(support_x); backbone(query_x)`` under ``no_grad``, nothing else.

Throughput ratio = images/s of the harness / images/s of the bare loop = ``t_bare / t_harness``
per repetition (the two alternate); median [min-max] over the repetitions.

Usage::

    python benchmarks/bench_harness.py [--episodes 30] [--reps 5] [--sizes 84,32] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_episodes import protonet  # noqa: E402
from common import emit, fmt_ms, fmt_ratio, interleaved, make_store, print_settings, ratio_stats, verdict  # noqa: E402

from fewshot_nsl.data.episodes import Materialiser, episode_list_for_store  # noqa: E402
from fewshot_nsl.evaluation import evaluate  # noqa: E402


def bench_size(size: int, n_episodes: int, reps: int, classes: int, per_class: int, progress: bool) -> dict:
    store = make_store(classes=classes, per_class=per_class, size=size)
    lst = episode_list_for_store(store, "test", 5, 5, 15, n=n_episodes, seed=0)
    method = protonet(size)
    method.eval()
    mat = Materialiser(store, size, torch.device("cpu"))
    tensors = [mat(e) for e in lst.episodes]
    backbone = method.backbone
    tmp = tempfile.TemporaryDirectory()
    counter = {"i": 0}

    def bare():
        with torch.no_grad():
            for t in tensors:
                backbone(t.support_x)
                backbone(t.query_x)

    def harness():
        counter["i"] += 1
        evaluate(method, store, lst, n_episodes, torch.device("cpu"), size,
                 Path(tmp.name) / f"run{counter['i']}.csv", progress=progress, batch_episodes=1)  # vs a per-episode loop

    times = interleaved({"bare": bare, "harness": harness}, reps=reps, warmup=1)
    tmp.cleanup()
    n_images = n_episodes * 100
    r = ratio_stats(times["bare"], times["harness"])
    met = verdict(r["median"], 0.80, ">=")
    print(f"\n-- {size}x{size}, {n_episodes} episodes x 100 images, per pass (median [min-max] of {reps})")
    for name, t in times.items():
        print(f"   {name:8s} {fmt_ms(t)}   {n_images / min(t):8.0f} images/s (best)")
    print(f"   harness throughput / bare throughput: {fmt_ratio(r)}   target >= 0.80: {met}")
    emit("5", f"harness throughput / bare forward loop, {size}x{size}", r, ">= 0.80", met,
         bare_ms_per_episode=1e3 * min(times["bare"]) / n_episodes, harness_ms_per_episode=1e3 * min(times["harness"]) / n_episodes)
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=30)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sizes", default="84,32")
    p.add_argument("--progress", action="store_true", help="keep the tqdm bar on in the harness")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = p.parse_args(argv)
    print_settings("bench_harness: target 5")
    classes, per_class = 20, 600
    if args.quick:
        args.episodes, args.reps, args.sizes, classes, per_class = 2, 2, "32", 6, 25
    for size in (int(s) for s in args.sizes.split(",")):
        bench_size(size, args.episodes, args.reps, classes, per_class, args.progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
