"""Target 3 (dynamic NSN): the per-location similarity vs a plain conv and vs the unfold reference; the full training step.

* layer: one 3x3 layer (padding 1) of CNN-4 (32 filters) at each of its four input shapes, batch
  ``--batch``, with a given per-location ``M_s`` (``(B, L, 9)`` DNS, ``(B, L, 9, 9)`` UNS; the
  predictor excluded), forward + backward to ``x``, ``W`` and ``M_s``:
  :func:`fewshot_nsl.nn.ns_conv2d` (``side="auto"``) vs :func:`torch.nn.functional.conv2d` of the same
  shape (forward + backward to ``x`` and ``W``) and vs :func:`fewshot_nsl.nn.ns_conv_reference`
  (unfold); ratios per repetition, the variants alternating; "sum" is the whole network's four layers.
* peak memory of one forward + backward of each implementation, each in a fresh subprocess (rise of
  the peak RSS, ``VmHWM`` reset with ``clear_refs``, over the call, after the inputs exist).
* model: one training step (forward, cross-entropy of a linear head, backward, SGD step) of the
  dynamic DNS CNN-4 (sphere predictors, disjoint) vs the plain CNN-4, batch ``--batch``, train mode,
  with ``channels_last`` inputs (what the harness's ``Materialiser`` gives on CPU) and contiguous ones.

Usage::

    python benchmarks/bench_dynamic_nsn.py [--reps 9] [--batch 64] [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, fmt_ms, fmt_ratio, interleaved, peak_rss_mb, print_settings, ratio_stats, run_child, stats, verdict  # noqa: E402

from fewshot_nsl.backbones import CNN4  # noqa: E402
from fewshot_nsl.nn import make_conv_factory, ns_conv2d, ns_conv_reference  # noqa: E402

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
#: CNN-4 (32 filters) layer inputs at 84x84: (C_in, side).
LAYERS = ((3, 84), (32, 42), (32, 21), (32, 10))
IMPLS = ("conv2d", "ns_conv2d", "reference")


def layer_inputs(batch: int, c_in: int, size: int, structure: str, c_out: int = 32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c_in, size, size, generator=g).requires_grad_()
    w = (0.1 * torch.randn(c_out, c_in, 3, 3, generator=g)).requires_grad_()
    shape = (batch, size * size, 9) if structure == "dns" else (batch, size * size, 9, 9)
    m = (1 + 0.1 * torch.randn(*shape, generator=g)).requires_grad_()
    return x, w, m


def layer_step(impl: str, x, w, m):
    def f():
        for t in (x, w, m):
            t.grad = None
        if impl == "conv2d":
            out = F.conv2d(x, w, None, 1, 1)
        elif impl == "ns_conv2d":
            out = ns_conv2d(x, w, None, m, 1, 1)
        else:
            out = ns_conv_reference(x, w, None, m, 1, 1)
        out.sum().backward()
    return f


def peak_child(impl: str, batch: int, c_in: int, size: int, structure: str) -> float:
    x, w, m = layer_inputs(batch, c_in, size, structure)
    return peak_rss_mb(layer_step(impl, x, w, m))  # VmHWM rise, the mark reset first


def bench_layers(batch: int, reps: int, structure: str, layers, memory: bool) -> dict:
    per_impl = {k: [0.0] * reps for k in IMPLS}
    print(f"\n-- dynamic {structure.upper()} layer 3x3 -> 32, batch {batch}, given M_s, forward+backward "
          f"(ms, median [min-max] of {reps}); peak = rise of peak RSS in a fresh process")
    results = {}
    for c_in, size in layers:
        x, w, m = layer_inputs(batch, c_in, size, structure)
        times = interleaved({k: layer_step(k, x, w, m) for k in IMPLS}, reps=reps, warmup=1)
        for k in IMPLS:
            per_impl[k] = [a + b for a, b in zip(per_impl[k], times[k])]
        peaks = {}
        if memory:
            for k in IMPLS:
                peaks[k] = run_child([__file__, "--peak-child", k, str(batch), str(c_in), str(size), structure])["peak_mb"]
        tag = f"{c_in}x{size}x{size}"
        vs_conv = ratio_stats(times["ns_conv2d"], times["conv2d"])
        vs_ref = ratio_stats(times["reference"], times["ns_conv2d"])
        print(f"   input {tag:10s} " + "  ".join(f"{k} {fmt_ms(times[k])}" + (f" peak {peaks[k]:.0f} MiB" if peaks else "") for k in IMPLS))
        print(f"   {'':16s} ns_conv2d / conv2d {fmt_ratio(vs_conv)}   reference / ns_conv2d {fmt_ratio(vs_ref, 1)}")
        results[tag] = {"vs_conv": vs_conv, "vs_ref": vs_ref, "peaks": peaks}
    vs_conv = ratio_stats(per_impl["ns_conv2d"], per_impl["conv2d"])
    vs_ref = ratio_stats(per_impl["reference"], per_impl["ns_conv2d"])
    met_conv = verdict(vs_conv["median"], 1.5, "<=")
    met_ref = verdict(vs_ref["median"], 5.0, ">=")
    print(f"   all four layers: ns_conv2d / conv2d {fmt_ratio(vs_conv)}   target <= 1.5x: {met_conv}")
    print(f"   all four layers: speed-up over the unfold reference {fmt_ratio(vs_ref, 1)}   target >= 5x: {met_ref}")
    peak_sum = {k: sum(r["peaks"].get(k, 0.0) for r in results.values()) for k in IMPLS} if memory else {}
    goal = structure == "dns"  # the targets are stated for DNS; UNS is reported alongside
    emit("3a", f"dynamic {structure} apply (predictor excluded) / plain conv, fwd+bwd, CNN-4 layers",
         vs_conv, "<= 1.5", met_conv if goal else None, per_layer={k: v["vs_conv"] for k, v in results.items()})
    emit("3c", f"dynamic {structure} apply: unfold reference / efficient, fwd+bwd, CNN-4 layers",
         vs_ref, ">= 5", met_ref if goal else None, per_layer={k: v["vs_ref"] for k, v in results.items()},
         peak_mib={k: v["peaks"] for k, v in results.items()})
    return {"vs_conv": vs_conv, "vs_ref": vs_ref, "layers": results, "peak_sum": peak_sum}


class FixedResidual(nn.Module):
    """Stands in for a similarity predictor: returns a fixed (trainable) residual ``(B, n, Ho, Wo)``."""

    def __init__(self, shape) -> None:
        super().__init__()
        self.r = nn.Parameter(0.01 * torch.randn(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.r


def without_predictors(net: nn.Module, batch: int, size: int) -> nn.Module:
    """Replace every dynamic layer's predictor by a :class:`FixedResidual` of its output shape (apply cost only)."""
    from fewshot_nsl.nn import NSConv2d

    x = torch.zeros(batch, 3, size, size)
    shapes = {}
    hooks = [m.predictor.register_forward_hook(lambda mod, i, o, m=m: shapes.__setitem__(m, o.shape))
             for m in net.modules() if isinstance(m, NSConv2d) and m.predictor is not None]
    with torch.no_grad():
        net.eval()(x)
    for h in hooks:
        h.remove()
    for m, shape in shapes.items():
        m.predictor = FixedResidual(shape)
    return net.train()


def bench_model(batch: int, size: int, reps: int, fmt: str = "contiguous") -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=FORMATS[fmt])
    y = torch.randint(0, 64, (batch,))
    variants = {
        "plain CNN-4": make_conv_factory("plain"),
        "dynamic DNS CNN-4": make_conv_factory("dynamic", structure="dns"),
        "dynamic UNS CNN-4": make_conv_factory("dynamic", structure="uns"),
    }
    nets = {name: CNN4(filters=32, conv_layer=factory).train() for name, factory in variants.items()}
    nets["dynamic DNS, predictor removed"] = without_predictors(CNN4(filters=32, conv_layer=variants["dynamic DNS CNN-4"]), batch, size)
    dim = nets["plain CNN-4"].feature_dim(size)
    steps = {}
    for name, net in nets.items():
        head = nn.Linear(dim, 64)
        opt = torch.optim.SGD(list(net.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)

        def step(net=net, head=head, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(head(net(x)), y).backward()
            opt.step()
        steps[name] = step
    times = interleaved(steps, reps=reps, warmup=1)
    print(f"\n-- training step, batch {batch}x3x{size}x{size} ({fmt} input), forward+backward+SGD (ms, median [min-max] of {reps})")
    for name, t in times.items():
        print(f"   {name:32s} {fmt_ms(t)}")
    out = {}
    for name in ("dynamic DNS CNN-4", "dynamic UNS CNN-4"):
        r = ratio_stats(times[name], times["plain CNN-4"])
        met = verdict(r["median"], 3.0, "<=")
        print(f"   {name} / plain: {fmt_ratio(r)}" + (f"   issue-6 target <= 3x: {met} (issue 14's <= 2.0x: bench_dynamic_targets.py)" if "DNS" in name else ""))
        emit("3b", f"{name} training step / plain CNN-4 step ({fmt}; issue-6 goal)", r, "<= 3", met if "DNS" in name else None)
        out[name] = r
    # where the DNS step's time goes: apply (predictor removed) vs predictor (the rest)
    plain, full, apply_only = (stats(times[k])["median"] for k in ("plain CNN-4", "dynamic DNS CNN-4", "dynamic DNS, predictor removed"))
    print(f"   dynamic DNS step = plain {1e3 * plain:.0f} ms + similarity apply {1e3 * (apply_only - plain):.0f} ms "
          f"+ predictors {1e3 * (full - apply_only):.0f} ms (medians; apply = step with each predictor replaced by a fixed M_s)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=84)
    p.add_argument("--structures", default="dns,uns")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--part", choices=("layer", "model", "all"), default="all")
    p.add_argument("--formats", default="channels_last,contiguous",
                   help="model-step input memory formats (the harness's Materialiser gives channels_last on CPU)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--peak-child", nargs=5, metavar=("IMPL", "B", "C", "S", "STRUCT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peak_child:
        impl, b, c, s, st = args.peak_child
        print(json.dumps({"peak_mb": peak_child(impl, int(b), int(c), int(s), st)}))
        return 0
    print_settings("bench_dynamic_nsn: target 3")
    layers = LAYERS
    if args.quick:
        args.reps, args.batch, args.size, args.structures, args.formats = 2, 2, 16, "dns", "channels_last"
        layers = ((32, 8),)
    if args.part in ("layer", "all"):
        for st in args.structures.split(","):
            bench_layers(args.batch, args.reps, st, layers, memory=not args.no_memory)
    if args.part in ("model", "all"):
        for fmt in args.formats.split(","):
            bench_model(args.batch, args.size, args.reps, fmt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
