"""What PyTorch's own switches do for CNN-4 on this CPU (before writing any kernel).

For the ProtoNet-style evaluation forward (100 images, 84x84, ``no_grad``, eval) and the training
step (batch 64, forward+backward+SGD), each variant alternates with the default in one process;
ratio = variant / default per repetition, median [min-max]:

* ``channels_last``: model and input in ``torch.channels_last``;
* ``mkldnn off``: ``torch.backends.mkldnn.enabled = False`` (the plain ATen CPU conv);
* ``1 thread``: ``torch.set_num_threads(1)`` (default: one per core);
* ``torch.compile``: inductor (C++ codegen) on the same module; compile time reported apart
  (evaluation also ``channels_last + compile``);
* ``inference_mode``: ``torch.inference_mode()`` instead of ``no_grad`` (evaluation only).

Usage::

    python benchmarks/bench_settings.py [--reps 7] [--no-compile] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, fmt_ms, fmt_ratio, interleaved, print_settings, ratio_stats  # noqa: E402

from fewshot_nsl.backbones import CNN4  # noqa: E402


@contextlib.contextmanager
def mkldnn(enabled: bool):
    old = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = old


@contextlib.contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def eval_variants(batch: int, size: int, compile_: bool):
    torch.manual_seed(0)
    net = CNN4(filters=32).eval()
    x = torch.randn(batch, 3, size, size)
    net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def fwd(model, inp, ctx=torch.no_grad):
        def f():
            with ctx():
                model(inp)
        return f

    def with_ctx(f, ctx, arg):
        def g():
            with ctx(arg):
                f()
        return g

    v = {
        "default": fwd(net, x),
        "channels_last": fwd(net_cl, x_cl),
        "mkldnn off": with_ctx(fwd(net, x), mkldnn, False),
        "1 thread": with_ctx(fwd(net, x), threads, 1),
        "inference_mode": fwd(net, x, torch.inference_mode),
    }
    extra = {}
    if compile_:
        compiled = torch.compile(copy.deepcopy(net))
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(x)
        extra["compile_s"] = time.perf_counter() - t0
        v["torch.compile"] = fwd(compiled, x)
        compiled_cl = torch.compile(copy.deepcopy(net_cl))
        with torch.no_grad():
            compiled_cl(x_cl)
        v["channels_last + compile"] = fwd(compiled_cl, x_cl)
    return v, extra


def train_variants(batch: int, size: int, compile_: bool):
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 64, (batch,))
    base = CNN4(filters=32)
    dim = base.feature_dim(size)

    def make(memory_format=torch.contiguous_format, compile_model=False):
        net = copy.deepcopy(base).train().to(memory_format=memory_format)
        head = nn.Linear(dim, 64)
        opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
        inp = x.contiguous(memory_format=memory_format)
        model = torch.compile(net) if compile_model else net

        def f():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(head(model(inp)), y).backward()
            opt.step()
        return f

    def with_ctx(f, ctx, arg):
        def g():
            with ctx(arg):
                f()
        return g

    v = {
        "default": make(),
        "channels_last": make(torch.channels_last),
        "mkldnn off": with_ctx(make(), mkldnn, False),
        "1 thread": with_ctx(make(), threads, 1),
    }
    extra = {}
    if compile_:
        f = make(compile_model=True)
        t0 = time.perf_counter()
        f()
        extra["compile_s"] = time.perf_counter() - t0
        v["torch.compile"] = f
    return v, extra


def report(title: str, variants, extra, reps: int, inner: int, key: str) -> None:
    times = interleaved(variants, reps=reps, warmup=1, inner=inner)
    print(f"\n-- {title} (ms, median [min-max] of {reps} x {inner}; ratio = variant / default per repetition)")
    for name, t in times.items():
        r = ratio_stats(t, times["default"])
        print(f"   {name:24s} {fmt_ms(t)}   {fmt_ratio(r, 3) if name != 'default' else ''}")
        if name != "default":
            emit("settings", f"{key}: {name} / default", r, "info", None)
    if "compile_s" in extra:
        print(f"   (torch.compile: first call incl. compilation {extra['compile_s']:.1f} s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--inner", type=int, default=2)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--size", type=int, default=84)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes, no compile (smoke test)")
    args = p.parse_args(argv)
    print_settings("bench_settings: PyTorch switches on CNN-4")
    if args.quick:
        args.reps, args.inner, args.batch, args.train_batch, args.size, args.no_compile = 2, 1, 4, 4, 32, True
    v, extra = eval_variants(args.batch, args.size, not args.no_compile)
    report(f"evaluation forward, {args.batch}x3x{args.size}x{args.size}", v, extra, args.reps, args.inner, "eval forward")
    v, extra = train_variants(args.train_batch, args.size, not args.no_compile)
    report(f"training step, batch {args.train_batch}x3x{args.size}x{args.size}", v, extra, args.reps, args.inner, "train step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
