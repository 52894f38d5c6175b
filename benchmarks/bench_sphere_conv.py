"""SphereConv of the dynamic predictors: the written-out autograd function against the composed ops.

For each CNN-4 layer the predictor's two cosine convs (conv1 ``C_in -> 16`` with the layer's padding,
conv2 ``16 -> 9``, padding 1, its output scaled per map as by the gain) run forward and backward on a
channels-last batch, in three forms that alternate within each repetition:

* ``composed, input padded``: what the suite ran before 2026-12-04 (pad the input, conv, squared
  norms, window sums, multiply; output times the gain; autograd through every op);
* ``composed``: the same ops with the padding given to the conv (only the one-channel map of squared
  norms padded): what runs under ``torch.compile``;
* ``function``: :func:`fewshot_nsl.nn.functional.sphere_conv2d` (one autograd function, output
  scaled in place, gain folded into the filters, written-out backward).

Prints median [min-max] ms per forward+backward and the per-repetition ratio function / composed-padded.
No target: it explains the predictor share of the step in ``bench_dynamic_targets.py``.

Usage::

    python benchmarks/bench_sphere_conv.py [--reps 9] [--batch 64] [--size 84]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import emit, fmt_ms, fmt_ratio, interleaved, print_settings, ratio_stats  # noqa: E402

from fewshot_nsl.nn.functional import _sphere_conv_ops, _unit_filters, _window_sums, sphere_conv2d  # noqa: E402

EPS = 1e-4


def composed_padded(x, w, scale=None):
    """Before: ``F.pad`` on the input, autograd through every op, the output times ``scale``."""
    xp = F.pad(x, (1, 1, 1, 1))
    num = F.conv2d(xp, _unit_filters(w, EPS))
    out = num * torch.rsqrt(_window_sums((xp * xp).sum(1, keepdim=True), (3, 3), (1, 1)) + EPS)
    return out if scale is None else out * scale.view(1, -1, 1, 1)


def composed(x, w, scale=None):
    """The same ops with the padding given to the conv (the ``torch.compile`` path)."""
    return _sphere_conv_ops(x, _unit_filters(w, EPS, scale), (1, 1), (1, 1), EPS)


def function(x, w, scale=None):
    return sphere_conv2d(x, w, 1, 1, eps=EPS, out_scale=scale)


def make_case(impl, c_in: int, size: int, batch: int):
    """One predictor's conv1 -> ReLU -> conv2 (times the gain), forward and backward."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c_in, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(c_in != 3)  # the image going into the first layer needs no gradient
    w1 = torch.randn(16, c_in, 3, 3, generator=g, requires_grad=True)
    w2 = torch.randn(9, 16, 3, 3, generator=g, requires_grad=True)
    gain = torch.full((9,), 0.1, requires_grad=True)
    up = torch.randn(batch, 9, size, size, generator=g).contiguous(memory_format=torch.channels_last)

    def run() -> None:
        out = impl(torch.relu(impl(x, w1)), w2, torch.tanh(gain))
        out.backward(up)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=84, help="input size of the first layer (CNN-4 halves it per layer)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    a = p.parse_args(argv)
    if a.quick:
        a.reps, a.batch, a.size = 2, 2, 16
    print_settings("SphereConv of the dynamic predictors: function vs composed ops", batch=a.batch, size=a.size)
    size, total = a.size, {"composed, input padded": 0.0, "function": 0.0}
    for layer, c_in in enumerate((3, 32, 32, 32), 1):
        fns = {"composed, input padded": make_case(composed_padded, c_in, size, a.batch),
               "composed": make_case(composed, c_in, size, a.batch),
               "function": make_case(function, c_in, size, a.batch)}
        t = interleaved(fns, a.reps)
        r = ratio_stats(t["function"], t["composed, input padded"])
        print(f"   layer {layer} predictor ({c_in} ch, {size}x{size}) fwd+bwd: "
              + "; ".join(f"{k} {fmt_ms(v).strip()}" for k, v in t.items())
              + f"; function / composed-padded {fmt_ratio(r)}", flush=True)
        emit("info", f"SphereConv predictor layer {layer} ({size} px): function / composed ops", r, "-", None)
        for k in total:
            total[k] += sorted(t[k])[len(t[k]) // 2]
        size //= 2
    print(f"   4 predictors, sum of medians: function {1e3 * total['function']:.1f} ms vs composed-padded "
          f"{1e3 * total['composed, input padded']:.1f} ms (x{total['function'] / total['composed, input padded']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
