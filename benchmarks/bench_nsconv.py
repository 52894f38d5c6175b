"""Timing and memory of the neural-similarity convs.

Usage::

    python benchmarks/bench_nsconv.py                 # both parts, CPU or CUDA if present
    python benchmarks/bench_nsconv.py --part model    # CNN-4 plain vs NSN, one forward+backward
    python benchmarks/bench_nsconv.py --part layer    # efficient dynamic apply vs unfold reference

Part ``model``: one forward+backward of CNN-4 (32 filters) on an 80-image 84x84 batch (a 5-way
episode of 5 + 11 images per class), for the plain CNN and NSN variants, median of ``--reps``
after a warm-up, all in one process; prints each time and its ratio to the plain CNN.

Part ``layer``: one 3x3 layer with a given per-location similarity ``m`` (predictor excluded):
efficient :func:`ns_conv2d` (``side="input"`` / ``"output"``) vs :func:`ns_conv_reference`,
forward+backward time, bytes saved for backward, and peak memory (CUDA: ``max_memory_allocated``;
CPU: peak-RSS increase measured in a fresh subprocess per variant).

CPU notes. PyTorch's CPU allocator returns big blocks to the OS, so every large temporary is
page-faulted in again; on some VMs that costs more than the arithmetic (a fresh 80 MB tensor:
~150 ms vs ~25 ms reused), and it penalises whichever variant allocates more. Keeping freed
memory in the heap, as CUDA's caching allocator does, removes it::

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184 \
        python benchmarks/bench_nsconv.py --threads 1

On an oversubscribed machine, ``--threads 1`` also avoids OpenMP barrier stalls that scale with
the number of ops rather than with their size.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fewshot_nsl.backbones import CNN4  # noqa: E402
from fewshot_nsl.nn import make_conv_factory, ns_conv2d, ns_conv_reference  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], None], reps: int, device: torch.device, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds over ``reps`` runs after ``warmup`` runs (1 run if a warm-up takes > 10 s)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(device)
    if time.perf_counter() - t0 > 10.0 * warmup:
        reps = 1
    times: List[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(device: torch.device, reps: int, batch: int, size: int) -> Dict[str, Dict[str, float]]:
    """Seconds per forward+backward of CNN-4 (32 filters) for each conv factory.

    Variants are interleaved within each repetition (one warm-up round first), so a load change on a
    shared machine hits all of them alike; the ratio is the median of the per-round ratios to ``plain``.
    """
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device)
    variants = {
        "plain": make_conv_factory("plain"),
        "static dns": make_conv_factory("static", structure="dns"),
        "dynamic dns (sphere, disjoint)": make_conv_factory("dynamic", structure="dns"),
        "dynamic dns (sphere, shared)": make_conv_factory("dynamic", structure="dns", sharing="shared"),
        "dynamic uns (sphere, disjoint)": make_conv_factory("dynamic", structure="uns"),
    }
    nets = {name: CNN4(filters=32, conv_layer=factory).to(device) for name, factory in variants.items()}
    times: Dict[str, List[float]] = {name: [] for name in nets}
    for rep in range(reps + 1):
        for name, net in nets.items():
            net.zero_grad(set_to_none=True)
            _sync(device)
            t0 = time.perf_counter()
            net(x).sum().backward()
            _sync(device)
            if rep > 0:
                times[name].append(time.perf_counter() - t0)
    return {
        name: {
            "seconds": statistics.median(ts),
            "ratio": statistics.median(t / p for t, p in zip(ts, times["plain"])),
        }
        for name, ts in times.items()
    }


def _layer_inputs(device: torch.device, batch: int, channels: int, size: int, structure: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g).to(device).requires_grad_()
    w = torch.randn(channels, channels, 3, 3, generator=g).to(device).requires_grad_()
    # Channel-first maps, as a predictor emits them, viewed per location: (B, L, kk[, kk]).
    n = 9 if structure == "dns" else 81
    maps = (1 + 0.1 * torch.randn(batch, n, size * size, generator=g)).to(device).requires_grad_()
    m = maps.transpose(1, 2)
    return x, w, m if structure == "dns" else m.reshape(batch, size * size, 9, 9)


def _layer_fn(impl: str, x: torch.Tensor, w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    if impl == "reference":
        return ns_conv_reference(x, w, None, m, 1, 1)
    if impl == "conv2d":
        return torch.nn.functional.conv2d(x, w, None, 1, 1)
    return ns_conv2d(x, w, None, m, 1, 1, side=impl)


def saved_bytes(impl: str, x: torch.Tensor, w: torch.Tensor, m: torch.Tensor) -> int:
    """Bytes of distinct storages that autograd saves for backward (inputs x, w, m excluded)."""
    seen: Dict[int, int] = {}
    own = {t.untyped_storage().data_ptr() for t in (x, w, m)}  # m is a view of the leaf maps

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _layer_fn(impl, x, w, m)
    return sum(seen.values())


def _peak_child(impl: str, device: str, batch: int, channels: int, size: int, structure: str) -> float:
    """Run in a subprocess: peak memory increase (MiB) of one forward+backward."""
    dev = torch.device(device)
    x, w, m = _layer_inputs(dev, batch, channels, size, structure)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _layer_fn(impl, x, w, m).sum().backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:  # Linux: reset the peak-RSS mark, then read VmHWM - VmRSS
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _proc_status_kib("VmRSS")
        _layer_fn(impl, x, w, m).sum().backward()
        return (_proc_status_kib("VmHWM") - base) / 1024
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _layer_fn(impl, x, w, m).sum().backward()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def bench_layer(device: torch.device, reps: int, batch: int, channels: int, size: int) -> List[Dict[str, object]]:
    """Time, saved bytes and peak memory of one dynamic layer per implementation."""
    rows: List[Dict[str, object]] = []
    for structure in ("dns", "uns"):
        x, w, m = _layer_inputs(device, batch, channels, size, structure)
        for impl in ("conv2d", "input", "output", "reference"):

            def step() -> None:
                x.grad = w.grad = None  # the maps' leaf keeps accumulating: one add, same for all impls
                _layer_fn(impl, x, w, m).sum().backward()

            seconds = median_time(step, reps, device)
            saved = saved_bytes(impl, x, w, m) / 2**20
            child = subprocess.run(
                [sys.executable, __file__, "--threads", str(torch.get_num_threads()), "--peak-child", impl, str(device), str(batch), str(channels), str(size), structure],
                capture_output=True,
                text=True,
                check=True,
            )
            peak = float(child.stdout.strip().splitlines()[-1])
            rows.append({"structure": structure, "impl": impl, "ms": 1000 * seconds, "saved_MiB": saved, "peak_MiB": peak})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("model", "layer", "all"), default="all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=80)
    parser.add_argument("--size", type=int, default=84)
    parser.add_argument("--layer-batch", type=int, default=80)
    parser.add_argument("--layer-channels", type=int, default=32)
    parser.add_argument("--layer-size", type=int, default=42)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: keep the default)")
    parser.add_argument("--peak-child", nargs=6, metavar=("IMPL", "DEVICE", "B", "C", "S", "STRUCT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        if args.threads:
            torch.set_num_threads(args.threads)
        impl, dev, b, c, s, st = args.peak_child
        print(_peak_child(impl, dev, int(b), int(c), int(s), st))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    if args.part in ("model", "all"):
        res = bench_model(device, args.reps, args.batch, args.size)
        print(f"\nCNN-4 (32 filters), batch {args.batch}x3x{args.size}x{args.size}, forward+backward, median of {args.reps}")
        for name, r in res.items():
            print(f"  {name:34s} {1000 * r['seconds']:9.1f} ms   x{r['ratio']:5.2f} (median per-round ratio to plain)")
    if args.part in ("layer", "all"):
        rows = bench_layer(device, args.reps, args.layer_batch, args.layer_channels, args.layer_size)
        print(
            f"\none 3x3 layer {args.layer_channels}->{args.layer_channels}, input {args.layer_batch}x"
            f"{args.layer_channels}x{args.layer_size}x{args.layer_size}, given m, forward+backward"
        )
        print(f"  {'structure':9s} {'impl':10s} {'ms':>9s} {'saved MiB':>10s} {'peak MiB':>9s}")
        for r in rows:
            print(f"  {r['structure']:9s} {r['impl']:10s} {r['ms']:9.1f} {r['saved_MiB']:10.1f} {r['peak_MiB']:9.1f}")
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
