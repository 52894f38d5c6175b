"""Target 4 (MAML): one second-order meta-training step, ours (``higher``) vs learn2learn, time and memory.

Set-up (as ``benchmarks/bench_maml.py``, which ``run_all.py`` runs too): CNN-4 (32 filters) + linear
head, 84x84, 5-way 5-shot 15 queries, ``--inner-steps`` (5) SGD steps at lr 0.01, meta-batch
``--meta-batch`` (4) episodes of seeded random images, one Adam step; both sides start from the same
initial weights (a deep copy of our method's network) and see the same tasks.

* ``maml``: our ``maml`` plugin (``higher.innerloop_ctx``, all weights adapted, BN on batch
  statistics) vs ``learn2learn.algorithms.MAML(network, lr=0.01, first_order=False)``;
* ``meta_static_nsn``: conv weights and batch norm frozen (BN on its stored statistics), the initial
  ``M_s`` of every layer and the head meta-learned and adapted, vs learn2learn's ``MAML(...,
  allow_nograd=True)`` over a copy of the same network with the same parameters frozen (learn2learn's
  way of restricting adaptation to a subset of parameters); DNS and UNS.

Each side runs in a fresh process, the two sides alternately, ``--reps`` times: the first step's peak
memory (peak RSS during the step minus the RSS before it, the peak mark reset after set-up), the
median time of ``--steps`` further steps, and (deterministic, beside the RSS figure) the bytes of the
distinct tensors autograd saves for one episode's meta-loss. Ratios ours / learn2learn per repetition; median [min-max].
The first-step losses of the two sides are compared as a check that they compute the same thing.

Usage::

    python benchmarks/bench_maml_targets.py [--reps 3] [--steps 2] [--meta-batch 4] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, emit, fmt_ratio, now, peak_rss_mb, print_settings, ratio_stats, run_child, stats, verdict  # noqa: E402


def worker(args: argparse.Namespace) -> dict:
    """One side (``args.side``: ``ours`` or ``l2l``) of one method's meta-training step, in this process."""
    import torch

    from common import l2l_maml_episode_loss, meta_training_step, quiet_learn2learn, random_episodes
    from fewshot_nsl.backbones import cnn4
    from fewshot_nsl.registry import create_method, load_plugins

    load_plugins([ROOT / "baselines"])
    torch.manual_seed(0)
    common_opts = dict(backbone=cnn4(filters=32), image_size=args.size, ways=5, inner_lr=0.01,
                       inner_steps=args.inner_steps, first_order=False)
    if args.method == "maml":
        method = create_method("maml", **common_opts)
    else:
        method = create_method("meta_static_nsn", structure=args.structure, **common_opts)
        method.after_pretrain()  # wrap convs (M_s = I), freeze W and BN, as after pretraining
    method.train()
    episodes = random_episodes(args.meta_batch, size=args.size)
    if args.side == "l2l":
        net = copy.deepcopy(method.network())
        if args.method == "meta_static_nsn":
            net.eval()  # frozen BN on stored statistics, as the method keeps its backbone
        maml = quiet_learn2learn().algorithms.MAML(net, lr=0.01, first_order=False,
                                                   allow_nograd=args.method == "meta_static_nsn")
        params = [p for p in maml.parameters() if p.requires_grad]
        episode_loss = l2l_maml_episode_loss(maml, args.inner_steps)
    else:
        params = [p for p in method.parameters() if p.requires_grad]
        episode_loss = method.loss
    step = meta_training_step(episode_loss, params, episodes)

    def saved_mib() -> float:
        """MiB of distinct storages autograd saves for one episode's meta-loss (deterministic)."""
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = episode_loss(*episodes[0])
        del loss
        return sum(seen.values()) / 2**20

    out = {}
    t0 = now()
    peak = peak_rss_mb(lambda: out.setdefault("loss", step()))
    first = now() - t0
    times = []
    for _ in range(args.steps):
        t0 = now()
        step()
        times.append(now() - t0)
    return {"side": args.side, "loss": out["loss"], "first_step_s": first, "median_s": statistics.median(times),
            "peak_mb": peak, "saved_mb": saved_mib(), "meta_params": sum(p.numel() for p in params), "threads": torch.get_num_threads()}


def run_side(method: str, side: str, structure: str, args: argparse.Namespace) -> dict:
    if args.in_process:  # smoke test: no fresh process (peak memory then means little)
        return worker(argparse.Namespace(**{**vars(args), "method": method, "side": side, "structure": structure}))
    return run_child([__file__, "--worker", method, side, structure, "--size", str(args.size),
                      "--inner-steps", str(args.inner_steps), "--meta-batch", str(args.meta_batch), "--steps", str(args.steps)])


def compare(label: str, target: str, method: str, structure: str, args: argparse.Namespace) -> None:
    ours, l2l = [], []
    for r in range(args.reps):
        order = ("ours", "l2l") if r % 2 == 0 else ("l2l", "ours")
        for side in order:
            (ours if side == "ours" else l2l).append(run_side(method, side, structure, args))
    t = ratio_stats([o["median_s"] for o in ours], [x["median_s"] for x in l2l])
    m = ratio_stats([o["peak_mb"] for o in ours], [x["peak_mb"] for x in l2l])
    loss_gap = max(abs(o["loss"] - x["loss"]) for o, x in zip(ours, l2l))
    saved = (ours[0]["saved_mb"], l2l[0]["saved_mb"])
    print(f"   {label} ({ours[0]['meta_params']} meta-parameters): step ours {stats([o['median_s'] for o in ours])['median']:.2f} s, "
          f"learn2learn {stats([x['median_s'] for x in l2l])['median']:.2f} s; peak ours "
          f"{stats([o['peak_mb'] for o in ours])['median']:.0f} MiB, learn2learn {stats([x['peak_mb'] for x in l2l])['median']:.0f} MiB; "
          f"saved for backward (one episode) ours {saved[0]:.0f} MiB, learn2learn {saved[1]:.0f} MiB; "
          f"|first-step loss gap| {loss_gap:.1e}")
    met_t, met_m = verdict(t["median"], 1.0, "<="), verdict(m["median"], 1.0, "<=")
    rs = saved[0] / saved[1]
    met_s = verdict(rs, 1.0 + 1e-6, "<=")
    print(f"   {label}: time ours / learn2learn {fmt_ratio(t)}  target <= 1: {met_t};  "
          f"peak memory ours / learn2learn {fmt_ratio(m)}  target <= 1: {met_m};  "
          f"saved-for-backward ours / learn2learn x{rs:.6f}: {met_s}")
    emit(target, f"{label}: step time ours / learn2learn", t, "<= 1", met_t,
         ours_s=stats([o["median_s"] for o in ours]), l2l_s=stats([x["median_s"] for x in l2l]), loss_gap=loss_gap)
    emit(target, f"{label}: peak memory ours / learn2learn", m, "<= 1", met_m,
         ours_mib=stats([o["peak_mb"] for o in ours]), l2l_mib=stats([x["peak_mb"] for x in l2l]),
         saved_mib={"ours": saved[0], "l2l": saved[1]})
    emit(target, f"{label}: saved-for-backward memory ours / learn2learn", {"median": rs, "min": rs, "max": rs}, "<= 1", met_s)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3, help="fresh-process runs of each side")
    p.add_argument("--steps", type=int, default=2, help="timed steps per run after the first")
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--size", type=int, default=84)
    p.add_argument("--structures", default="dns,uns", help="meta_static_nsn similarity structures")
    p.add_argument("--quick", action="store_true", help="tiny sizes, all in this process (smoke test)")
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "SIDE", "STRUCTURE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.method, args.side, args.structure = args.worker
        print(json.dumps(worker(args)))
        return 0
    print_settings("bench_maml_targets: target 4")
    args.in_process = args.quick
    if args.quick:
        args.reps, args.steps, args.meta_batch, args.inner_steps, args.size, args.structures = 1, 1, 1, 1, 16, "dns"
    print(f"\n-- second-order meta-training step, CNN-4 (32 filters), {args.size}x{args.size}, 5-way 5-shot 15 queries, "
          f"{args.inner_steps} inner steps, meta-batch {args.meta_batch}; {args.reps} fresh-process runs per side "
          f"(alternating), median of {args.steps} steps each")
    if args.in_process:
        print("   (quick: everything in one process; the peak-memory figures mean little)")
    compare("MAML (higher) vs learn2learn MAML", "4a", "maml", "dns", args)
    from fewshot_nsl.registry import list_methods

    if "meta_static_nsn" not in list_methods():
        print("   meta_static_nsn is not registered: skipped")
        return 0
    for st in args.structures.split(","):
        compare(f"meta_static_nsn {st} (higher) vs learn2learn MAML on M_s + head", "4b", "meta_static_nsn", st, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
