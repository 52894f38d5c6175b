"""Which side of a dynamic DNS / UNS similarity is fastest here, and what ``side="auto"`` picks.

Usage::

    python benchmarks/measure_sides.py                          # CUDA if present, else CPU; CNN-4 layer shapes at 84 px
    python benchmarks/measure_sides.py --compile                # also each side under torch.compile (inductor)
    python benchmarks/measure_sides.py --device cpu --batch 4 --sizes 21 --reps 2   # a quick CPU run

One 3x3 layer (padding 1, stride 1) with a given per-location similarity ``m`` (predictor excluded), the
shapes of CNN-4's four layers at 84 px (``C_in -> C_out`` at ``84, 42, 21, 10`` px), an episode-sized
batch: forward + backward time of :func:`fewshot_nsl.nn.ns_conv2d` with ``side="input"``, ``"output"``
and (DNS) ``"taps"``, median of ``--reps`` after a warm-up (CUDA: synchronised), and the side
:func:`fewshot_nsl.nn.ns_conv_ops.choose_side` takes on this device. The GPU rule of ``choose_side`` (never
``"taps"``; the smaller ``kk``-fold tensor otherwise) is derived from kernel counts and GEMM shapes and has
not been measured yet: this script is the measurement (paste its table into ``benchmarks/GPU_RESULTS.md``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot_nsl.nn import ns_conv2d  # noqa: E402
from fewshot_nsl.nn.ns_conv_ops import choose_side  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], None], reps: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in ms over ``reps`` calls, after one warm-up call (compilation happens there)."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def layer_step(side: str, structure: str, batch: int, c_in: int, c_out: int, size: int, device: torch.device,
               compiled: bool) -> Callable[[], None]:
    """Forward + backward of one dynamic layer on ``side`` (inputs channels-last, as the backbones run them)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c_in, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c_out, c_in, 3, 3, generator=g) / 12).to(device)
    shape = (batch, size * size, 9) if structure == "dns" else (batch, size * size, 9, 9)
    m = (1 + 0.1 * torch.randn(shape, generator=g)).to(device)
    leaves = [t.requires_grad_() for t in (x, w, m)]

    def apply(x_: torch.Tensor, w_: torch.Tensor, m_: torch.Tensor) -> torch.Tensor:
        return ns_conv2d(x_, w_, None, m_, 1, 1, side=side)

    fn = torch.compile(apply, fullgraph=True) if compiled else apply

    def step() -> None:
        for t in leaves:
            t.grad = None
        fn(*leaves).sum().backward()

    return step


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=80, help="images per call (a 5-way 5-shot episode of 16 per class)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[84, 42, 21, 10], help="input side of each layer")
    parser.add_argument("--channels", type=int, default=32, help="CNN-4 width (the stem reads 3)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time each side under torch.compile")
    parser.add_argument("--structures", nargs="+", default=["dns", "uns"], choices=["dns", "uns"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, batch {args.batch}, threads {torch.get_num_threads()}")
    print(f"{'structure':9s} {'C_in->C_out':12s} {'size':>4s} {'mode':8s} " + " ".join(f"{s:>9s}" for s in ("input", "output", "taps"))
          + "  fastest  auto")
    for structure in args.structures:
        for i, size in enumerate(args.sizes):
            c_in = 3 if i == 0 else args.channels
            sides = ["input", "output"] + (["taps"] if structure == "dns" else [])
            padded = (size + 3) * (size + 2)
            auto = choose_side(structure, device.type, (c_in, args.channels), (1, 1), (size, size), padded, (size + 2, size + 2))
            for compiled in [False] + ([True] if args.compile else []):
                times = {s: time_ms(layer_step(s, structure, args.batch, c_in, args.channels, size, device, compiled),
                                    args.reps, device) for s in sides}
                cells = " ".join(f"{times[s]:9.2f}" if s in times else f"{'-':>9s}" for s in ("input", "output", "taps"))
                fastest = min(times, key=times.get)
                print(f"{structure:9s} {f'{c_in}->{args.channels}':12s} {size:4d} {'compiled' if compiled else 'eager':8s} "
                      f"{cells}  {fastest:7s}  {auto}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
