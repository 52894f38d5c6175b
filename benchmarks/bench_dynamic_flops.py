"""Issue-29 target of the dynamic NSN training step against its arithmetic: FLOP ratio, time ratio and time ratio /
FLOP ratio of the dynamic steps over the plain step.

The step is :func:`bench_dynamic_targets.make_step` (imported, not copied): forward, cross-entropy of a linear head
over 64 classes, backward and SGD with momentum of CNN-4 (32 filters), channels-last input, batch ``--batch``, at
each ``--sizes``. Variants (the quick profile's dynamic NSN conv spec, :func:`fewshot_nsl.inputs.conv_spec_of`,
with one change each): DNS with the SphereNet predictor of width 16 (the quick profile's), width 64, the authors'
predictor (``conv: {predictor: authors, hidden: 64}``), and UNS width 16.

FLOPs: one step under :class:`torch.utils.flop_counter.FlopCounterMode` (matrix products and convolutions, forward
and backward; element-wise work is not counted by the counter and not here). The counter is a dispatch mode, so it
sees the ops run inside the package's autograd Functions (``taps.py``, ``sides.py``, ``sphere_ops.py``) in their
forward and backward alike; but its registry has no formula for the in-place ``aten.addmm_``, which the DNS taps
Function's backward uses for its weight gradient (one GEMM per tap), so that third of the taps GEMMs is invisible to
the default counter. This script adds formulas for the in-place GEMMs (:data:`EXTRA_FORMULAS`), checks the count of
one taps layer against its analytic GEMM count, lists any other matrix-product op a step runs that no formula
covers, and prints both ratios: the counter's default registry (how the issue's orientation numbers were counted:
DNS w16 1.87x / 1.96x at 84 / 42 px, w64 4.8x / 4.9x, UNS w16 5.9x) and the complete count. The targets (DNS w16:
time / FLOP ratio <= 1.3 at 84 px, <= 1.8 at 42 px) are judged on both.

Time: the variants alternate within each of ``--reps`` repetitions after a warm-up; a ratio is per repetition
(variant / plain), median [min-max]; time / FLOP divides it by the (exact) FLOP ratio.

Usage::

    python benchmarks/bench_dynamic_flops.py [--reps 5] [--sizes 84,42] [--batch 64] [--threads N] [--quick]
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_dynamic_targets import make_step  # noqa: E402
from common import emit, fmt_ms, fmt_ratio, interleaved, print_settings, ratio_stats, verdict  # noqa: E402

aten = torch.ops.aten


def _addmm_(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """``self += a @ b``: ``2 m k n`` (the counter's formula for ``addmm``)."""
    m, k = a_shape
    return 2 * m * k * b_shape[1]


def _baddbmm_(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """``self += a @ b`` batched: ``2 b m k n``."""
    b, m, k = a_shape
    return 2 * b * m * k * b_shape[2]


#: Formulas the counter's registry lacks: the in-place GEMMs (the DNS taps backward accumulates its weight gradient
#: with ``addmm_``).
EXTRA_FORMULAS: Dict[object, Callable[..., int]] = {aten.addmm_: _addmm_, aten.baddbmm_: _baddbmm_}
#: Matrix-product ops; one a step runs that neither the registry nor :data:`EXTRA_FORMULAS` covers is reported.
MATRIX_OPS = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "addbmm", "addbmm_", "mv", "addmv", "addmv_",
              "dot", "vdot", "addr", "addr_", "matmul", "linear", "einsum", "tensordot", "convolution",
              "convolution_backward", "_convolution", "conv2d", "_convolution_double_backward", "_slow_conv2d_forward",
              "_slow_conv2d_backward", "mkldnn_convolution", "_mkldnn_convolution")

#: name -> options merged over the quick profile's dynamic NSN conv spec.
VARIANTS: Dict[str, Dict[str, object]] = {
    "DNS w16": {},
    "DNS w64": {"hidden": 64},
    "DNS authors w64": {"predictor": "authors", "hidden": 64},
    "UNS w16": {"structure": "uns"},
}
#: The issue's orientation FLOP ratios (counted with the counter's default registry), by (variant, size).
ORIENTATION: Dict[Tuple[str, int], float] = {
    ("DNS w16", 84): 1.87, ("DNS w16", 42): 1.96, ("DNS w64", 84): 4.8, ("DNS w64", 42): 4.9,
    ("UNS w16", 84): 5.9, ("UNS w16", 42): 5.9,
}
#: The issue's targets: time ratio / FLOP ratio of the DNS width-16 step at most this, by size.
TARGETS: Dict[int, float] = {84: 1.3, 42: 1.8}


def quick_conv_spec() -> Dict[str, object]:
    """The conv options of the quick profile's dynamic NSN (without ``kind``)."""
    from fewshot_nsl.config import resolve_config
    from fewshot_nsl.inputs import conv_spec_of

    spec = dict(conv_spec_of(resolve_config({"method": "dynamic_nsn", "profile": "quick", "backbone": "cnn4"})))
    spec.pop("kind", None)
    return spec


def count_flops(step: Callable[[], None]) -> Tuple[int, int, Dict[str, int]]:
    """``(complete, default registry only, per op)`` FLOPs of one call of ``step`` (called once before, untimed, so
    lazily made state such as momentum buffers exists)."""
    step()
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as fc:
        step()
    per_op = {str(k): int(v) for k, v in fc.get_flop_counts()["Global"].items()}
    extra = sum(per_op.get(str(op), 0) for op in EXTRA_FORMULAS)
    total = int(fc.get_total_flops())
    return total, total - extra, per_op


class _OpRecorder(TorchDispatchMode):
    """Records the op packets dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._overloadpacket] += 1
        return func(*args, **(kwargs or {}))


def uncounted_matrix_ops(step: Callable[[], None]) -> List[str]:
    """Matrix-product ops one call of ``step`` dispatches that neither the counter's registry nor
    :data:`EXTRA_FORMULAS` covers."""
    with _OpRecorder() as rec:
        step()
    known = set(flop_registry) | set(EXTRA_FORMULAS)
    return sorted(str(op) for op in rec.ops if op not in known and str(op).split(".", 1)[-1] in MATRIX_OPS)


def check_taps_function() -> None:
    """Count one DNS taps layer (``fewshot_nsl.nn.taps.taps_conv``, an autograd Function) forward + backward and
    compare with its analytic GEMM count: per tap, one GEMM forward, two backward (input and weight gradients)."""
    from fewshot_nsl.nn.taps import taps_conv

    torch.manual_seed(0)
    b, c_in, c_out, h = 2, 8, 8, 6
    x = torch.randn(b, c_in, h, h).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(c_out, c_in, 3, 3, requires_grad=True)
    m = torch.randn(b, h * h, 9, requires_grad=True)
    counts = {}
    for label, mapping in (("default", {}), ("complete", EXTRA_FORMULAS)):
        with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
            taps_conv(x, w, m, (3, 3), (1, 1), (1, 1, 1, 1), (h, h)).sum().backward()
        counts[label] = int(fc.get_total_flops())
    rows, wp = h + 2 + 1, h + 2  # padded rows (one extra), padded width
    used = (b - 1) * rows * wp + h * wp  # positions the Function computes (taps.py)
    gemm = 2 * used * c_in * c_out * 9  # one GEMM per tap over every used position
    seen, complete = counts["default"] / gemm, counts["complete"] / gemm
    print(f"\n-- counter check on the DNS taps autograd Function (one layer, forward + backward): default registry "
          f"{seen:.2f}x, with the in-place formulas {complete:.2f}x the GEMMs of its forward (analytic: 3.00x = forward "
          f"+ input gradient + weight gradient)")
    if abs(complete - 3) < 1e-9 and abs(seen - 2) < 1e-9:
        print("   FlopCounterMode sees the ops run inside autograd Functions (forward and backward); the taps backward's "
              "weight-gradient GEMMs (aten.addmm_) have no formula in its registry: added here")
    else:
        print("   unexpected: the taps Function's GEMMs are not counted as described above; read its code again")


def bench_size(size: int, batch: int, reps: int, base_spec: Dict[str, object], check_ops: bool) -> None:
    steps = {"plain": make_step("plain", size, batch, False)}
    for name, opts in VARIANTS.items():
        steps[name] = make_step("dynamic", size, batch, False, {**base_spec, **opts})
    flops = {name: count_flops(fn) for name, fn in steps.items()}
    if check_ops:
        missing = sorted({op for fn in steps.values() for op in uncounted_matrix_ops(fn)})
        print(f"   matrix-product ops a step runs without a FLOP formula: {', '.join(missing) if missing else 'none'}")
    times = interleaved(steps, reps=reps, warmup=1)
    plain_total, plain_default, _ = flops["plain"]
    print(f"\n-- training step, CNN-4 (32 filters) + linear head (64 classes), batch {batch}x3x{size}x{size} channels-last, "
          f"forward+backward+SGD; {reps} repetitions")
    print(f"   {'variant':16s} {'GFLOP':>8s} {'ms: median [min-max]':>30s} {'FLOP ratio':>11s} {'(default, issue)':>20s} "
          f"{'time ratio':>22s} {'time / FLOP ratio':>22s} {'(default count)':>16s}")
    print(f"   {'plain':16s} {plain_total / 1e9:8.2f} {fmt_ms(times['plain']):>30s}")
    for name in VARIANTS:
        total, default, _ = flops[name]
        fr, fr_default = total / plain_total, default / plain_default
        tr = ratio_stats(times[name], times["plain"])
        tf = {k: v / fr for k, v in tr.items()}
        tf_default = {k: v / fr_default for k, v in tr.items()}
        orient = ORIENTATION.get((name, size))
        issue = f"{fr_default:.2f} ({orient})" if orient else f"{fr_default:.2f}"
        print(f"   {name:16s} {total / 1e9:8.2f} {fmt_ms(times[name]):>30s} {fr:10.2f}x {issue:>20s} "
              f"{fmt_ratio(tr):>22s} {fmt_ratio(tf):>22s} {'x%.2f' % tf_default['median']:>16s}")
        extra = {"flop_ratio": fr, "flop_ratio_default_registry": fr_default, "time_ratio": tr, "gflop": total / 1e9,
                 "orientation_flop_ratio": orient}
        target = TARGETS.get(size) if name == "DNS w16" else None
        met = verdict(tf["median"], target, "<=") if target is not None else None
        met_default = verdict(tf_default["median"], target, "<=") if target is not None else None
        if target is not None:
            print(f"   {name} time / FLOP ratio, target <= {target}: {met} (complete count), {met_default} (default "
                  f"registry, as in the issue)")
        emit("29c", f"{name} training step: time ratio / FLOP ratio (complete count), {size} px", tf,
             f"<= {target}" if target is not None else "info", met, **extra)
        if target is not None:
            emit("29c", f"{name} training step: time ratio / FLOP ratio (counter's default registry), {size} px",
                 tf_default, f"<= {target}", met_default, **extra)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sizes", default="84,42")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.reps, args.batch, args.sizes = 2, 4, "16"
    print_settings("bench_dynamic_flops: issue 29")
    base = quick_conv_spec()
    print(f"   quick profile dynamic NSN conv spec: {base}; variants: "
          + "; ".join(f"{k} = {v or 'as is'}" for k, v in VARIANTS.items()))
    check_taps_function()
    for i, size in enumerate(int(s) for s in args.sizes.split(",")):
        bench_size(size, args.batch, args.reps, base, check_ops=i == 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
