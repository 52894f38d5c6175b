"""Target 2 (static NSN): folded inference vs the plain CNN-4; a training step with ``M_s`` unfolded vs the plain step.

Models: CNN-4 (32 filters); the static NSN is the plain network with every conv wrapped by
:func:`fewshot_nsl.nn.wrap_convs_static` (``M_s`` trained away from ``I`` by a random
perturbation, so folding is not a no-op); the folded network is :func:`fewshot_nsl.nn.fold_all`
of a copy of it.

* inference: ``forward`` of a 5-way 5-shot 15-query episode (100 images, 84x84) under ``no_grad``,
  eval mode: folded static NSN vs plain CNN-4 (same shapes), and the unfolded static NSN for reference;
Both are measured with ``channels_last`` inputs (what the harness's ``Materialiser`` gives on CPU)
and with contiguous NCHW inputs (``--formats``).

* training step: ``zero_grad``, cross-entropy of a linear head on a batch, ``backward``, SGD step
  over all parameters (conv weights, ``M_s``, BN, head), batch ``--train-batch`` (64, the pretraining
  batch), train mode: static NSN (DNS and UNS, ``M_s`` unfolded) vs plain CNN-4.

Ratios are per repetition, the variants alternating; median [min-max].

Usage::

    python benchmarks/bench_static_nsn.py [--reps 15] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, fmt_ms, fmt_ratio, interleaved, print_settings, ratio_stats, verdict  # noqa: E402

from fewshot_nsl.backbones import CNN4  # noqa: E402
from fewshot_nsl.nn import fold_all, similarity_parameters, wrap_convs_static  # noqa: E402

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def static_nsn(plain: nn.Module, structure: str) -> nn.Module:
    net = wrap_convs_static(copy.deepcopy(plain), structure=structure)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in similarity_parameters(net):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


def bench_inference(batch: int, size: int, reps: int, inner: int, fmt: str = "contiguous") -> dict:
    torch.manual_seed(0)
    plain = CNN4(filters=32).eval()
    nsn = static_nsn(plain, "uns").eval()
    folded = fold_all(copy.deepcopy(nsn)).eval()
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=FORMATS[fmt])
    with torch.no_grad():
        err = (folded(x) - nsn(x)).abs().max().item()
    assert err < 1e-3, err

    def fwd(net):
        def f():
            with torch.no_grad():
                net(x)
        return f

    times = interleaved({"plain CNN-4": fwd(plain), "folded static NSN": fwd(folded), "unfolded static NSN (uns)": fwd(nsn)},
                        reps=reps, warmup=2, inner=inner)
    print(f"\n-- inference, {batch}x3x{size}x{size} ({fmt} input), no_grad, eval (ms per forward, median [min-max] of {reps} x {inner})")
    for name, t in times.items():
        print(f"   {name:28s} {fmt_ms(t)}")
    r = ratio_stats(times["folded static NSN"], times["plain CNN-4"])
    met = verdict(abs(r["median"] - 1.0), 0.02, "<=")
    print(f"   folded / plain: {fmt_ratio(r, 3)}   target within 2% (0.98-1.02): {met}   (max |folded - unfolded| = {err:.1e})")
    emit("2a", f"folded static NSN inference / plain CNN-4 ({fmt})", r, "within 2% (0.98-1.02)", met)
    ru = ratio_stats(times["unfolded static NSN (uns)"], times["plain CNN-4"])
    print(f"   unfolded / plain (for reference): {fmt_ratio(ru, 3)}")
    return r


def bench_training(batch: int, size: int, reps: int, inner: int, fmt: str = "contiguous") -> dict:
    torch.manual_seed(0)
    plain = CNN4(filters=32)
    dim = plain.feature_dim(size)
    nets = {"plain CNN-4": plain, "static NSN dns": static_nsn(plain, "dns"), "static NSN uns": static_nsn(plain, "uns")}
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=FORMATS[fmt])
    y = torch.randint(0, 64, (batch,))

    def train_step(net):
        net = copy.deepcopy(net).train()
        head = nn.Linear(dim, 64)
        params = list(net.parameters()) + list(head.parameters())
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)

        def f():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(head(net(x)), y).backward()
            opt.step()
        return f

    times = interleaved({k: train_step(v) for k, v in nets.items()}, reps=reps, warmup=2, inner=inner)
    print(f"\n-- training step, batch {batch}x3x{size}x{size} ({fmt} input), forward+backward+SGD (ms, median [min-max] of {reps} x {inner})")
    for name, t in times.items():
        print(f"   {name:28s} {fmt_ms(t)}")
    out = {}
    for name in ("static NSN dns", "static NSN uns"):
        r = ratio_stats(times[name], times["plain CNN-4"])
        met = verdict(r["median"], 1.3, "<=")
        print(f"   {name} / plain: {fmt_ratio(r, 3)}   target <= 1.3x: {met}")
        emit("2b", f"{name} training step (M_s unfolded) / plain CNN-4 step ({fmt})", r, "<= 1.3", met)
        out[name] = r
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--inner", type=int, default=2)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--size", type=int, default=84)
    p.add_argument("--formats", default="channels_last,contiguous",
                   help="input memory formats (the harness's Materialiser gives channels_last on CPU)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = p.parse_args(argv)
    print_settings("bench_static_nsn: target 2")
    if args.quick:
        args.reps, args.inner, args.batch, args.train_batch, args.size, args.formats = 2, 1, 4, 4, 32, "channels_last"
    for fmt in args.formats.split(","):
        bench_inference(args.batch, args.size, args.reps, args.inner, fmt)
        bench_training(args.train_batch, args.size, args.reps, args.inner, fmt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
