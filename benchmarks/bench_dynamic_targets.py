"""Issue-14 targets of the dynamic NSN: the training step against the plain step (eager and compiled), and the
evaluation of dynamic NSN against the same evaluation on a plain CNN-4.

* step: one training step (forward, cross-entropy of a linear head over 64 classes, backward, SGD with
  momentum) of CNN-4 (32 filters), channels-last input (what the harness's ``Materialiser`` gives on CPU),
  batch ``--batch``, at each ``--sizes``: plain eager (the reference), dynamic DNS eager, and with
  ``--compile`` dynamic DNS and plain compiled with :func:`fewshot_nsl.compiling.compile_in_place`. The
  variants alternate within each repetition; ratios are per repetition, median [min-max]. Compilation
  time (the first two calls of a compiled step) is reported apart, and amortised over the 1920
  pretraining steps of a quick-profile cell (24 epochs x 80 batches of glyphs).
* eval: :func:`fewshot_nsl.evaluation.evaluate` of ``dynamic_nsn`` with its quick-profile head protocol
  (SGD lr 0.01, batch 4, 100 passes over the support features) on ``--episodes`` 5-way 5-shot 15-query
  episodes of a synthetic 42 px store, against the same method object with its backbone replaced by a
  plain CNN-4 (so only the backbone differs); the two alternate, ``--eval-reps`` repetitions. Weights are
  untrained: the work per episode does not depend on them.

Usage::

    python benchmarks/bench_dynamic_targets.py [--reps 5] [--sizes 84,42] [--batch 64] [--compile [--compile-sizes 42]] [--episodes 600]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import emit, fmt_ms, fmt_ratio, interleaved, make_store, print_settings, ratio_stats, stats, verdict  # noqa: E402

from fewshot_nsl.backbones import CNN4  # noqa: E402
from fewshot_nsl.compiling import backend_problem, compile_in_place  # noqa: E402
from fewshot_nsl.nn import make_conv_factory  # noqa: E402

QUICK_PRETRAIN_STEPS = 1920  # quick profile: 24 epochs x ceil(5120 / 64) batches of the 64 glyphs base classes


def make_step(kind: str, size: int, batch: int, compiled: bool, conv_options: Optional[Dict[str, object]] = None):
    """A closure running one training step of CNN-4 (``kind`` plain or dynamic) on a fixed batch.

    ``conv_options``: options of the dynamic conv factory (default ``{"structure": "dns"}``); ignored for plain.
    """
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 64, (batch,))
    conv = make_conv_factory("plain") if kind == "plain" else make_conv_factory("dynamic", **(conv_options or {"structure": "dns"}))
    net = CNN4(filters=32, conv_layer=conv)
    model = nn.Sequential(net, nn.Linear(net.feature_dim(size), 64)).train()
    if compiled:
        compile_in_place(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def bench_step(size: int, batch: int, reps: int, compiled: bool) -> None:
    steps = {"plain eager": make_step("plain", size, batch, False), "dynamic DNS eager": make_step("dynamic", size, batch, False)}
    compile_s = {}
    if compiled:
        for name, kind in (("dynamic DNS compiled", "dynamic"), ("plain compiled", "plain")):
            fn = make_step(kind, size, batch, True)
            t0 = time.perf_counter()
            fn()
            fn()
            compile_s[name] = time.perf_counter() - t0
            steps[name] = fn
    times = interleaved(steps, reps=reps, warmup=1)
    print(f"\n-- training step, CNN-4, batch {batch}x3x{size}x{size} channels-last, forward+backward+SGD "
          f"(ms, median [min-max] of {reps})")
    for name, t in times.items():
        print(f"   {name:24s} {fmt_ms(t)}" + (f"   compilation {compile_s[name]:.1f} s" if name in compile_s else ""))
    for name in [n for n in times if n.startswith("dynamic")]:
        r = ratio_stats(times[name], times["plain eager"])
        met = verdict(r["median"], 2.0, "<=")
        print(f"   {name} / plain eager: {fmt_ratio(r)}   target <= 2.0x: {met}")
        extra = {}
        if name in compile_s:
            saved = stats(times["dynamic DNS eager"])["median"] - stats(times[name])["median"]
            amortised = compile_s[name] / QUICK_PRETRAIN_STEPS
            pays = f"after {compile_s[name] / saved:.0f} steps" if saved > 0 else "never (not faster)"
            print(f"   compilation {compile_s[name]:.1f} s = {1e3 * amortised:.1f} ms per step over a quick cell's "
                  f"{QUICK_PRETRAIN_STEPS} pretraining steps; it pays for itself {pays}")
            extra = {"compile_s": compile_s[name], "amortised_ms_per_step": 1e3 * amortised}
        emit("14a", f"{name} training step / plain eager step, {size} px", r, "<= 2.0", met, **extra)


def bench_eval(episodes: int, reps: int) -> None:
    from fewshot_nsl.data.episodes import episode_list_for_store
    from fewshot_nsl.evaluation import evaluate
    from fewshot_nsl.registry import create_method

    size = 42
    store = make_store(classes=20, per_class=60, size=size)
    lst = episode_list_for_store(store, "test", 5, 5, 15, n=episodes, seed=0)
    torch.manual_seed(0)
    dyn = create_method("dynamic_nsn", backbone=CNN4(filters=32, conv_layer=make_conv_factory("dynamic", structure="dns")),
                        image_size=size, optimizer="sgd", lr=0.01, batch_size=4, epochs=100).eval()
    plain = create_method("dynamic_nsn", backbone=CNN4(filters=32, conv_layer=make_conv_factory("dynamic", structure="dns")),
                          image_size=size, optimizer="sgd", lr=0.01, batch_size=4, epochs=100)
    plain.backbone = CNN4(filters=32)  # the same head protocol on a plain CNN-4
    plain.eval()
    tmp = tempfile.TemporaryDirectory()
    counter = {"i": 0}

    def run(method):
        def f():
            counter["i"] += 1
            with torch.no_grad():
                evaluate(method, store, lst, episodes, torch.device("cpu"), size, Path(tmp.name) / f"r{counter['i']}.csv", progress=False)
        return f

    times = interleaved({"plain CNN-4": run(plain), "dynamic DNS CNN-4": run(dyn)}, reps=reps, warmup=0)
    tmp.cleanup()
    r = ratio_stats(times["dynamic DNS CNN-4"], times["plain CNN-4"])
    met = verdict(r["median"], 1.5, "<=")
    print(f"\n-- dynamic_nsn evaluation (quick head protocol), {episodes} episodes 5-way 5-shot 15-query at {size} px "
          f"(s, median [min-max] of {reps})")
    for name, t in times.items():
        s = stats(t)
        print(f"   {name:20s} {s['median']:8.1f} s [{s['min']:.1f}-{s['max']:.1f}]")
    print(f"   dynamic / plain: {fmt_ratio(r)}   target <= 1.5x: {met}")
    emit("14c", f"{episodes}-episode dynamic NSN evaluation / same on plain CNN-4, {size} px", r, "<= 1.5", met)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sizes", default="84,42")
    p.add_argument("--compile", action="store_true", help="also time the compiled steps (inductor; minutes of compilation)")
    p.add_argument("--compile-sizes", help="sizes at which to time the compiled steps (default: all of --sizes)")
    p.add_argument("--episodes", type=int, default=600, help="evaluation episodes (0: skip the evaluation target)")
    p.add_argument("--eval-reps", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = p.parse_args(argv)
    print_settings("bench_dynamic_targets: issue 14")
    if args.quick:
        args.reps, args.batch, args.sizes, args.episodes, args.compile = 2, 4, "16", 2, False
    if args.compile and backend_problem(torch.device("cpu")):
        print(f"   --compile ignored: {backend_problem(torch.device('cpu'))}")
        args.compile = False
    compile_sizes = {int(s) for s in (args.compile_sizes or args.sizes).split(",")}
    for size in (int(s) for s in args.sizes.split(",")):
        bench_step(size, args.batch, args.reps, args.compile and size in compile_sizes)
    if args.episodes > 0:
        bench_eval(args.episodes, args.eval_reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
