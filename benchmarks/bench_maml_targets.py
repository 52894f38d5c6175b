"""Target 4 (MAML): one second-order meta-training step, ours (``higher``) vs learn2learn, time and memory.

A thin wrapper over ``benchmarks/bench_maml.py`` (its worker builds both sides from the same
initial weights on the same tasks: CNN-4, 32 filters, 84x84, 5-way 5-shot 15 queries, 5 inner SGD
steps at lr 0.01, meta-batch 4, Adam): it runs the ``ours-2nd`` and ``l2l-2nd`` workers alternately,
``--reps`` times each, every run a fresh process; each run reports its median step time over
``--steps`` steps after the first, and the rise of peak RSS over its first step. Ratios
(ours / learn2learn) are taken per repetition; median [min-max].

Where ``meta_static_nsn`` is registered, the same is done for its meta-training step against a
learn2learn MAML restricted to the same parameters (see :func:`meta_static_worker`).

Usage::

    python benchmarks/bench_maml_targets.py [--reps 3] [--steps 2] [--meta-batch 4] [--quick]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, fmt_ratio, print_settings, ratio_stats, run_child, stats, verdict  # noqa: E402

BENCH_MAML = Path(__file__).resolve().parent / "bench_maml.py"


def maml_run(variant: str, args: argparse.Namespace) -> dict:
    return run_child([
        str(BENCH_MAML), "--variant", variant, "--size", str(args.size), "--filters", "32", "--ways", "5",
        "--shots", "5", "--queries", "15", "--inner-steps", str(args.inner_steps),
        "--meta-batch", str(args.meta_batch), "--reps", str(args.steps), "--threads", "0", "--device", "cpu",
    ])


def compare(label: str, target: str, run_ours, run_l2l, reps: int) -> None:
    ours, l2l = [], []
    for r in range(reps):
        pair = (("ours", run_ours), ("l2l", run_l2l)) if r % 2 == 0 else (("l2l", run_l2l), ("ours", run_ours))
        for name, fn in pair:
            (ours if name == "ours" else l2l).append(fn())
    t = ratio_stats([o["median_s"] for o in ours], [x["median_s"] for x in l2l])
    m = ratio_stats([o["peak_mb"] for o in ours], [x["peak_mb"] for x in l2l])
    print(f"   {label}: step time ours {stats([o['median_s'] for o in ours])['median']:.2f} s, "
          f"learn2learn {stats([x['median_s'] for x in l2l])['median']:.2f} s; "
          f"peak RSS rise ours {stats([o['peak_mb'] for o in ours])['median']:.0f} MiB, "
          f"learn2learn {stats([x['peak_mb'] for x in l2l])['median']:.0f} MiB")
    loss_gap = max(abs(o["loss"] - x["loss"]) for o, x in zip(ours, l2l))
    met_t, met_m = verdict(t["median"], 1.0, "<="), verdict(m["median"], 1.0, "<=")
    print(f"   {label}: time ours / learn2learn {fmt_ratio(t)}  target <= 1: {met_t};  "
          f"memory ours / learn2learn {fmt_ratio(m)}  target <= 1: {met_m};  |first-step loss gap| {loss_gap:.1e}")
    emit(target, f"{label}: step time ours / learn2learn", t, "<= 1", met_t,
         ours_s=stats([o["median_s"] for o in ours]), l2l_s=stats([x["median_s"] for x in l2l]))
    emit(target, f"{label}: peak memory ours / learn2learn", m, "<= 1", met_m,
         ours_mib=stats([o["peak_mb"] for o in ours]), l2l_mib=stats([x["peak_mb"] for x in l2l]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3, help="fresh-process runs of each side")
    p.add_argument("--steps", type=int, default=2, help="timed steps per run after the first")
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--size", type=int, default=84)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = p.parse_args(argv)
    print_settings("bench_maml_targets: target 4")
    if args.quick:
        args.reps, args.steps, args.meta_batch, args.inner_steps, args.size = 1, 1, 1, 1, 32
    print(f"\n-- second-order MAML meta-training step, CNN-4 (32 filters), {args.size}x{args.size}, 5-way 5-shot 15 queries, "
          f"{args.inner_steps} inner steps, meta-batch {args.meta_batch}; {args.reps} fresh-process runs per side, "
          f"median of {args.steps} steps each")
    compare("MAML (higher) vs learn2learn MAML", "4a",
            lambda: maml_run("ours-2nd", args), lambda: maml_run("l2l-2nd", args), args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
