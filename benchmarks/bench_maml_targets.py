"""Target 4 (MAML): one second-order meta-training step, ours (``higher``) vs learn2learn, time and memory.

A thin wrapper over ``benchmarks/bench_maml.py`` (its worker builds both sides from the same
initial weights on the same tasks: CNN-4, 32 filters, 84x84, 5-way 5-shot 15 queries, 5 inner SGD
steps at lr 0.01, meta-batch 4, Adam): it runs the ``ours-2nd`` and ``l2l-2nd`` workers alternately,
``--reps`` times each, every run a fresh process; each run reports its median step time over
``--steps`` steps after the first, and the rise of peak RSS over its first step. Ratios
(ours / learn2learn) are taken per repetition; median [min-max].

The same for ``meta_static_nsn`` (its own worker below, same protocol): conv weights and batch norm
frozen (BN on the stored statistics), the initial ``M_s`` of every layer and the linear head
meta-learned, ``inner_steps`` SGD steps on ``M_s`` and head; against learn2learn's ``MAML(...,
allow_nograd=True)`` over a copy of the same network with the same parameters frozen, which is
learn2learn's way of restricting adaptation to a subset of parameters.

Usage::

    python benchmarks/bench_maml_targets.py [--reps 3] [--steps 2] [--meta-batch 4] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, fmt_ratio, print_settings, ratio_stats, run_child, stats, verdict  # noqa: E402

BENCH_MAML = Path(__file__).resolve().parent / "bench_maml.py"


def maml_run(variant: str, args: argparse.Namespace) -> dict:
    if args.in_process:  # smoke test: no fresh process (peak memory then means little)
        import bench_maml

        ns = argparse.Namespace(variant=variant, size=args.size, filters=32, ways=5, shots=5, queries=15,
                                inner_steps=args.inner_steps, meta_batch=args.meta_batch, reps=args.steps,
                                threads=0, device="cpu")
        return bench_maml.worker(ns)
    return run_child([
        str(BENCH_MAML), "--variant", variant, "--size", str(args.size), "--filters", "32", "--ways", "5",
        "--shots", "5", "--queries", "15", "--inner-steps", str(args.inner_steps),
        "--meta-batch", str(args.meta_batch), "--reps", str(args.steps), "--threads", "0", "--device", "cpu",
    ])


def meta_static_worker(args: argparse.Namespace) -> dict:
    """One side (``ours`` or ``l2l``) of the meta_static_nsn step, in this (fresh) process."""
    import torch
    import torch.nn.functional as F

    from common import quiet_learn2learn
    from fewshot_nsl.backbones import cnn4
    from fewshot_nsl.registry import create_method

    torch.manual_seed(0)
    method = create_method("meta_static_nsn", backbone=cnn4(filters=32), image_size=args.size, structure=args.structure,
                           ways=5, inner_lr=0.01, inner_steps=args.inner_steps, first_order=False)
    method.after_pretrain()  # wrap convs (M_s = I), freeze W and BN, as after pretraining
    method.train()
    g = torch.Generator().manual_seed(1)
    episodes = []
    for _ in range(args.meta_batch):
        sy, qy = torch.arange(5).repeat_interleave(5), torch.arange(5).repeat_interleave(15)
        episodes.append((torch.rand(len(sy), 3, args.size, args.size, generator=g), sy,
                         torch.rand(len(qy), 3, args.size, args.size, generator=g), qy))
    if args.side == "l2l":
        l2l = quiet_learn2learn()
        net = copy.deepcopy(method.network()).eval()  # same frozen W/BN, same initial M_s and head
        maml = l2l.algorithms.MAML(net, lr=0.01, first_order=False, allow_nograd=True)
        params = [p for p in maml.parameters() if p.requires_grad]

        def episode_loss(sx, sy, qx, qy):
            learner = maml.clone()
            for _ in range(args.inner_steps):
                learner.adapt(F.cross_entropy(learner(sx), sy))
            return F.cross_entropy(learner(qx), qy)
    else:
        params = [p for p in method.parameters() if p.requires_grad]
        episode_loss = method.loss
    opt = torch.optim.Adam(params, lr=1e-3)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for ep in episodes:
            loss = episode_loss(*ep) / len(episodes)
            loss.backward()
            total += float(loss)
        opt.step()
        return total

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    loss = step()
    first = time.perf_counter() - t0
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"side": args.side, "loss": loss, "first_step_s": first, "median_s": statistics.median(times),
            "peak_mb": peak, "meta_params": sum(p.numel() for p in params)}


def meta_static_run(side: str, structure: str, args: argparse.Namespace) -> dict:
    if args.in_process:
        return meta_static_worker(argparse.Namespace(**{**vars(args), "side": side, "structure": structure}))
    return run_child([__file__, "--worker", side, "--structure", structure, "--size", str(args.size),
                      "--inner-steps", str(args.inner_steps), "--meta-batch", str(args.meta_batch), "--steps", str(args.steps)])


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
    p.add_argument("--structures", default="dns,uns", help="meta_static_nsn similarity structures")
    p.add_argument("--quick", action="store_true", help="tiny sizes, all in this process (smoke test)")
    p.add_argument("--worker", choices=("ours", "l2l"), help=argparse.SUPPRESS)
    p.add_argument("--structure", default="dns", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.side = args.worker
        print(json.dumps(meta_static_worker(args)))
        return 0
    print_settings("bench_maml_targets: target 4")
    args.in_process = args.quick
    if args.quick:
        args.reps, args.steps, args.meta_batch, args.inner_steps, args.size = 1, 1, 1, 1, 16
    print(f"\n-- second-order MAML meta-training step, CNN-4 (32 filters), {args.size}x{args.size}, 5-way 5-shot 15 queries, "
          f"{args.inner_steps} inner steps, meta-batch {args.meta_batch}; {args.reps} fresh-process runs per side, "
          f"median of {args.steps} steps each")
    if args.in_process:
        print("   (quick: everything in one process; the peak-memory figures mean little)")
    compare("MAML (higher) vs learn2learn MAML", "4a",
            lambda: maml_run("ours-2nd", args), lambda: maml_run("l2l-2nd", args), args.reps)
    from fewshot_nsl.registry import list_methods

    if "meta_static_nsn" not in list_methods():
        print("   meta_static_nsn is not registered: skipped")
        return 0
    structures = ["dns"] if args.quick else args.structures.split(",")
    print(f"\n-- meta_static_nsn meta-training step (second order, M_s and head adapted, W and BN frozen), same set-up")
    for st in structures:
        compare(f"meta_static_nsn {st} (higher) vs learn2learn MAML on M_s + head", "4b",
                lambda st=st: meta_static_run("ours", st, args), lambda st=st: meta_static_run("l2l", st, args), args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
