"""Time and peak memory of one MAML meta-training step: our ``maml`` plugin (higher) vs learn2learn's MAML.

Both start from the same initial weights (CNN-4 + linear head, our plugin's network, BN on batch
statistics) and run the same step on the same episode: for each of ``meta_batch`` episodes, the
inner loop (``inner_steps`` SGD steps, lr 0.01) on the support set, the query loss, ``backward``;
then one Adam step.

Method:
* time: wall clock (and process CPU time, steadier on a shared machine) of whole steps, the median
  over ``--reps`` steps after the first;
* peak memory: each variant runs in a fresh subprocess. On CPU, the rise of the process's peak
  resident set size (``resource.getrusage(...).ru_maxrss``) over the first step, measured from
  after set-up (imports, model, episode in memory); on CUDA, ``torch.cuda.max_memory_allocated``
  during the first step minus the memory allocated before it. (tracemalloc cannot see torch's
  CPU allocations.)

Usage::

    python benchmarks/bench_maml.py                     # 84x84, 32 filters, 5-way 5-shot 15 queries, meta-batch 1
    python benchmarks/bench_maml.py --meta-batch 4 --reps 3
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("ours-2nd", "l2l-2nd", "ours-1st", "l2l-1st")


def worker(args: argparse.Namespace) -> dict:
    """Run one variant in this process and return its figures."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch

    from common import l2l_maml_episode_loss, meta_training_step, quiet_learn2learn, random_episodes
    from fewshot_nsl.backbones import cnn4
    from fewshot_nsl.registry import create_method

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    first_order = args.variant.endswith("1st")
    torch.manual_seed(0)
    method = create_method(
        "maml", backbone=cnn4(filters=args.filters), image_size=args.size, ways=args.ways,
        inner_lr=0.01, inner_steps=args.inner_steps, first_order=first_order,
    ).to(device).train()
    episodes = random_episodes(args.meta_batch, args.ways, args.shots, args.queries, args.size, device=device)

    if args.variant.startswith("l2l"):
        maml = quiet_learn2learn().algorithms.MAML(copy.deepcopy(method.network()), lr=0.01, first_order=first_order)
        step = meta_training_step(l2l_maml_episode_loss(maml, args.inner_steps), list(maml.parameters()), episodes)
    else:
        step = meta_training_step(method.loss, list(method.parameters()), episodes)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    sync()
    t0 = time.perf_counter()
    loss = step()
    sync()
    first = time.perf_counter() - t0
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    times, cpu_times = [], []
    for _ in range(args.reps):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return {"variant": args.variant, "loss": loss, "first_step_s": first, "median_s": statistics.median(times),
            "median_cpu_s": statistics.median(cpu_times), "times_s": times, "peak_mb": peak_mb, "threads": torch.get_num_threads(), "device": str(device)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=84)
    p.add_argument("--filters", type=int, default=32)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--meta-batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5, help="timed steps after the first")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # worker mode
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(worker(args)))
        return 0
    print(f"one MAML meta-training step: CNN-4 ({args.filters} filters) + linear head, {args.size}x{args.size}, "
          f"{args.ways}-way {args.shots}-shot {args.queries} queries, {args.inner_steps} inner steps, "
          f"meta-batch {args.meta_batch}, device {args.device}; fresh process per variant")
    print(f"{'variant':10s} {'median s':>9s} {'cpu s':>7s} {'first s':>8s} {'peak MB':>8s}  loss")
    rows = []
    for v in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", v] + [
            a for k, val in vars(args).items() if k not in ("variant", "variants")
            for a in (f"--{k.replace('_', '-')}", str(val))
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{v:10s} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{v:10s} {r['median_s']:9.3f} {r['median_cpu_s']:7.3f} {r['first_step_s']:8.3f} {r['peak_mb']:8.1f}  "
              f"{r['loss']:.6f}")
    if rows:
        print(f"(torch threads {rows[0]['threads']}; peak = rise of peak RSS over the first step on CPU, "
              f"max_memory_allocated on CUDA; median over {args.reps} steps after the first; same loss = same weights and episode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
