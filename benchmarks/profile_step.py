"""Where the time goes: ``torch.profiler`` operator tables of the steps the targets measure.

Variants (CNN-4, 32 filters, 84x84):

* ``plain``, ``static_uns``, ``static_dns``, ``dynamic_dns``, ``dynamic_uns``: one training step
  (forward, cross-entropy of a linear head, backward), batch ``--batch`` (64);
* ``eval``: the ProtoNet evaluation forward of one episode (25 support + 75 query images, ``no_grad``);
* ``layer_dns``, ``layer_uns``, ``layer_conv2d``: one 3x3 32->32 layer on ``(batch, 32, 42, 42)``
  (CNN-4's second layer), forward + backward: ``ns_conv2d`` with a given per-location ``M_s``, or
  the plain conv.

For the dynamic variants the self time is also split by the part of the layer it belongs to (the
similarity predictor, the similarity application ``ns_conv2d``, the rest of the network) with
``record_function`` ranges around the predictor and ``ns_conv2d`` (forward only; backward ops are
listed by their autograd node names). ``--quick-profile`` builds them as the quick profile's dynamic
NSN does (``DynamicNSN.default_conv`` with ``zero_init_residual: false``, predictor width 16; issue
29's target); ``--by-shape`` groups the table by input shapes (which layer an operator ran in); the
header gives the operator calls per step (per-call overhead is what sets the time on small maps).

Usage::

    python benchmarks/profile_step.py --variant dynamic_dns [--quick-profile] [--size 42] [--steps 2] [--rows 20] [--by-shape]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_settings  # noqa: E402

from fewshot_nsl.backbones import CNN4  # noqa: E402
from fewshot_nsl.nn import NSConv2d, make_conv_factory, wrap_convs_static  # noqa: E402

VARIANTS = ("plain", "static_dns", "static_uns", "dynamic_dns", "dynamic_uns", "eval", "layer_dns", "layer_uns", "layer_conv2d")


class _Labelled(nn.Module):
    """Wraps a module so its forward shows up as one ``record_function`` range."""

    def __init__(self, inner: nn.Module, label: str) -> None:
        super().__init__()
        self.inner, self.label = inner, label

    def forward(self, x):
        with record_function(self.label):
            return self.inner(x)


def build(variant: str, quick_profile: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if variant.startswith("dynamic"):
        options = {"structure": variant.split("_")[1]}
        if quick_profile:  # DynamicNSN.default_conv merged with the quick profile's conv: {zero_init_residual: false}
            from fewshot_nsl.methods.dynamic_nsn import DynamicNSN

            options = {**{k: v for k, v in DynamicNSN.default_conv.items() if k != "kind"}, **options, "zero_init_residual": False}
        net = CNN4(filters=32, conv_layer=make_conv_factory("dynamic", **options))
        for m in net.modules():
            if isinstance(m, NSConv2d) and m.predictor is not None:
                m.predictor = _Labelled(m.predictor, "similarity predictor")  # type: ignore[assignment]
        return net
    net = CNN4(filters=32)
    if variant.startswith("static"):
        wrap_convs_static(net, structure=variant.split("_")[1])
    return net


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=VARIANTS, default="dynamic_dns")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=84)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--quick-profile", action="store_true", help="dynamic variants as the quick profile builds them (no gate)")
    p.add_argument("--by-shape", action="store_true", help="group the operator table by input shapes")
    p.add_argument("--format", choices=("channels_last", "contiguous"), default="channels_last",
                   help="input memory format of the model variants (the harness gives channels_last on CPU)")
    args = p.parse_args(argv)
    print_settings(f"profile_step: {args.variant}", input_format=args.format)
    fmt = torch.channels_last if args.format == "channels_last" else torch.contiguous_format
    if args.variant.startswith("layer"):
        from bench_dynamic_nsn import layer_inputs, layer_step

        structure = "dns" if args.variant == "layer_conv2d" else args.variant.split("_")[1]
        x, w, m = layer_inputs(args.batch, 32, args.size // 2, structure)
        step = layer_step("conv2d" if args.variant == "layer_conv2d" else "ns_conv2d", x, w, m)
    elif args.variant == "eval":
        net = build(args.variant, args.quick_profile)
        net.eval()
        xs, xq = (torch.randn(n, 3, args.size, args.size).contiguous(memory_format=fmt) for n in (25, 75))

        def step():
            with torch.no_grad():
                net(xs)
                net(xq)
    else:
        net = build(args.variant, args.quick_profile)
        import fewshot_nsl.nn.nsconv as nsconv

        original = nsconv.ns_conv2d

        def labelled(*a, **k):
            with record_function("ns_conv2d (similarity apply)"):
                return original(*a, **k)

        nsconv.ns_conv2d = labelled  # this profiling script only
        net.train()
        head = nn.Linear(net.feature_dim(args.size), 64)
        x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=fmt)
        y = torch.randint(0, 64, (args.batch,))

        def step():
            net.zero_grad(set_to_none=True)
            F.cross_entropy(head(net(x)), y).backward()
    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
        for _ in range(args.steps):
            step()
    avg = prof.key_averages(group_by_input_shape=args.by_shape)
    total = sum(e.self_cpu_time_total for e in avg)
    calls = sum(e.count for e in avg if not e.key.startswith(("similarity predictor", "ns_conv2d (")))
    print(f"\n-- {args.variant}: {total / 1e3 / args.steps:.1f} ms self CPU per step, {calls / args.steps:.0f} operator calls "
          f"per step; top operators by self time")
    print(avg.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48,
                    max_shapes_column_width=80))
    ranges = [e for e in avg if e.key in ("similarity predictor", "ns_conv2d (similarity apply)")]
    for e in ranges:
        print(f"   forward range {e.key!r}: {e.cpu_time_total / 1e3 / args.steps:.1f} ms per step "
              f"({100 * e.cpu_time_total / total:.1f}% of all self time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
