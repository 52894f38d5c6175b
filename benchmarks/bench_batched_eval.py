"""Issue-29 targets of the batched evaluation: batched / per-episode evaluation time per method, the per-episode
accuracies of both paths compared, and (``--memory``) the peak memory of a batched evaluation at 84 px.

* time: :func:`fewshot_nsl.evaluation.evaluate` over ``--episodes`` 5-way 5-shot 15-query episodes of a synthetic
  ``--size`` px store (:func:`common.make_store`, 20 classes x 600 images like Mini-ImageNet's test split, so
  each image is drawn about 5 times), once batched (``batch_episodes="auto"``)
  and once per episode (``batch_episodes=1``), the two alternating within each of ``--reps`` repetitions, at each
  ``--threads`` count; per-episode ms of both, the ratio batched / per-episode (median [min-max] over the
  repetitions), and the verdicts of the issue's targets: <= 0.1 finetune (Chen et al.'s head protocol), <= 0.25
  dynamic NSN, <= 0.3 static NSN, MAML and meta-learned static NSN (the others are reported without a target).
  A method without batched evaluation prints ``per-episode only`` and its target is MISSED for that reason.
* floor (``--floor``, CPU): the FLOPs of one per-episode evaluation against the float32 peak at the thread
  count: the lowest batched / per-episode ratio any batched path could reach (it does the same arithmetic).
* same numbers: the per-episode accuracies of the two paths (first repetition), and how many episodes differ.
* memory (``--memory``): for each method a fresh subprocess builds it, evaluates one default (``auto``) batch of
  episodes at ``--memory-size`` px (84) and reports its peak RSS (``ru_maxrss``: the whole process, imports and
  model included) and the rise over the RSS before the evaluation; on CUDA the peak of allocated device memory.
  Target: below 4 GB (on the whole-process figure).

Methods are built as a run of the quick profile builds them (:func:`fewshot_nsl.config.resolve_config` +
:func:`fewshot_nsl.inputs.build_method`, CNN-4 as the profile makes it, each method's quick options; the
``after_pretrain`` hook of a pretraining-based method run as the harness runs it). Weights are untrained: the work
per episode does not depend on them (accuracies are near chance, and they are compared between the paths only).

Usage::

    python benchmarks/bench_batched_eval.py [--episodes 600] [--threads 1,2] [--reps 1] [--methods finetune,...]
                                            [--memory] [--floor] [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (  # noqa: E402
    _status_kib, emit, fmt_ratio, interleaved, make_store, print_settings, ratio_stats, reset_peak_rss, run_child, stats, verdict,
)

#: The methods timed by default, in the order printed.
METHODS = ("finetune", "dynamic_nsn", "static_nsn", "maml", "meta_static_nsn",
           "protonet", "nearest_neighbor", "matchingnet", "relationnet")
#: Issue 29's targets: batched / per-episode evaluation time at most this (methods not listed: reported only).
TARGETS: Dict[str, float] = {"finetune": 0.1, "dynamic_nsn": 0.25, "static_nsn": 0.3, "maml": 0.3, "meta_static_nsn": 0.3}
#: Issue 29's memory target for a default batch at 84 px (MiB).
MEMORY_TARGET_MB = 4096
WAYS, SHOTS, QUERIES = 5, 5, 15
#: The synthetic store: shaped like Mini-ImageNet's test split (20 classes x 600 images), so that 600 five-shot
#: episodes draw each image about 5 times, as there (what the batched path's embedding cache can save).
STORE_CLASSES, STORE_PER_CLASS = 20, 600


def build(name: str, size: int, device: torch.device):
    """``name`` built as a quick-profile run builds it (CNN-4, the profile's method options), in eval mode, with
    its ``after_pretrain`` hook run when it has a pretraining stage. Untrained weights."""
    from fewshot_nsl.config import resolve_config
    from fewshot_nsl.inputs import build_method

    cfg = resolve_config({"method": name, "profile": "quick", "image_size": size, "ways": WAYS, "shots": SHOTS,
                          "backbone": "cnn4", "device": device.type})
    torch.manual_seed(0)
    method = build_method(cfg)
    if "pretrain" in method.stages(cfg.method_options):
        method.after_pretrain()
    if hasattr(type(method), "batched_on_cpu"):  # time the batched path also where it is off by default on a CPU
        method.batched_on_cpu = True
    return method.to(device).eval()


def store_and_episodes(size: int, episodes: int, directory: Path):
    """The synthetic test store (20 classes x 600 images of ``size`` px) and ``episodes`` 5-way 5-shot 15-query
    episodes on it."""
    from fewshot_nsl.data.episodes import episode_list_for_store

    store = make_store(classes=STORE_CLASSES, per_class=STORE_PER_CLASS, size=size, directory=directory)
    return store, episode_list_for_store(store, "test", WAYS, SHOTS, QUERIES, n=episodes, seed=0)


# ----------------------------------------------------------------------------- time
def time_method(name: str, store, lst, episodes: int, size: int, reps: int, device: torch.device, tmp: Path) -> None:
    """Time ``evaluate`` batched vs per episode for ``name``; print and emit the figures."""
    from fewshot_nsl.evaluation import evaluate

    threads = torch.get_num_threads()
    try:
        method = build(name, size, device)
    except Exception as exc:  # a method that cannot be built here is reported, not fatal
        print(f"   {name:17s} not built: {type(exc).__name__}: {exc}")
        emit("29a", f"{name}: batched / per-episode evaluation time, {size} px, {threads} thread(s)",
             None, _goal(name), "MISSED" if name in TARGETS else None, reason="not built")
        return
    if not method.supports_batched_evaluation():
        print(f"   {name:17s} per-episode only (no batched evaluation yet)" + ("   target: MISSED" if name in TARGETS else ""))
        if name in TARGETS:
            emit("29a", f"{name}: batched / per-episode evaluation time, {size} px, {threads} thread(s)",
                 None, _goal(name), "MISSED", reason="per-episode only")
        return
    counter = {"i": 0}
    accuracies: Dict[str, List[List[float]]] = {"per-episode": [], "batched": []}
    info: Dict[str, object] = {}

    def run(path: str, batch, n: int = episodes, keep: bool = True):
        def f():
            counter["i"] += 1
            out = tmp / f"{name}_{counter['i']}.csv"
            acc = evaluate(method, store, lst, n, device, size, out, progress=False, batch_episodes=batch,
                           info=info if batch == "auto" else None)
            if keep:
                accuracies[path].append(acc)
            out.unlink(missing_ok=True)
        return f

    run("per-episode", 1, n=min(2, episodes), keep=False)()  # warm-up: first-call allocations, lazy imports
    run("batched", "auto", n=min(2, episodes), keep=False)()
    times = interleaved({"per-episode": run("per-episode", 1), "batched": run("batched", "auto")}, reps=reps,
                        warmup=0, device=device)
    r = ratio_stats(times["batched"], times["per-episode"])
    per_ep = {k: 1e3 * stats(v)["median"] / episodes for k, v in times.items()}
    a, b = accuracies["per-episode"][0], accuracies["batched"][0]
    differ = sum(1 for x, y in zip(a, b) if abs(x - y) > 1e-9)
    target = TARGETS.get(name)
    met = verdict(r["median"], target, "<=") if target is not None else None
    print(f"   {name:17s} per-episode {per_ep['per-episode']:8.2f} ms/ep   batched {per_ep['batched']:8.2f} ms/ep "
          f"(batch {info.get('batch_episodes')})   batched / per-episode {fmt_ratio(r, 3)}"
          + (f"   target <= {target}: {met}" if target is not None else "   (no target)")
          + f"   episodes differing: {differ} of {len(a)}"
          + (f" (max |diff| {max(abs(x - y) for x, y in zip(a, b)):.2f} points)" if differ else ""), flush=True)
    if info.get("embedded_images"):
        print(f"   {'':17s} {info['embedded_images']}", flush=True)
    if "batched_fallback" in info or "float64" in str(info.get("batched_check", "")):
        print(f"   {'':17s} check: {info.get('batched_fallback') or info['batched_check']}", flush=True)
    emit("29a", f"{name}: batched / per-episode evaluation time, {episodes} episodes 5w5s15q, {size} px, "
         f"{threads} thread(s)", r, _goal(name), met, ms_per_episode=per_ep, batch_episodes=info.get("batch_episodes"),
         episodes_differing=differ, episodes=len(a), threads=threads)


def _goal(name: str) -> str:
    return f"<= {TARGETS[name]}" if name in TARGETS else "info"


# ----------------------------------------------------------------------------- memory
def memory_child(name: str, size: int, store_dir: Path, device: torch.device, cap: int = 0) -> Dict[str, object]:
    """In a fresh process: evaluate one default (``auto``) batch of ``name`` at ``size`` px (at most ``cap`` episodes
    when ``cap`` > 0). Returns the process's peak RSS during the evaluation (MiB, the whole process: imports, model
    and store included; the peak mark is reset to the current RSS first, ``/proc/self/clear_refs``, else the
    lifetime ``ru_maxrss``), the RSS before it, and on CUDA the peak allocated device memory (MiB)."""
    from fewshot_nsl.evaluation import evaluate, resolve_batch_episodes
    from fewshot_nsl.host_memory import retain_freed_memory

    retain_freed_memory()  # as in a run: the heap keeps what it frees, so the peak is the run's peak
    store, lst = store_and_episodes(size, 600, store_dir)
    method = build(name, size, device)
    per_call = resolve_batch_episodes(method, "auto", device, len(lst.episodes), WAYS * SHOTS, WAYS * QUERIES, size)
    n = max(per_call, 2) if cap <= 0 else min(max(per_call, 2), cap)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    reset = reset_peak_rss()
    rss_before = _status_kib("VmRSS") / 1024
    with tempfile.TemporaryDirectory() as tmp:
        info: Dict[str, object] = {}
        evaluate(method, store, lst, n, device, size, Path(tmp) / "m.csv", progress=False, batch_episodes="auto", info=info)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = _status_kib("VmHWM") / 1024 if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out: Dict[str, object] = {"method": name, "batched": method.supports_batched_evaluation(),
                              "batch_episodes": info.get("batch_episodes"), "default_batch": per_call, "episodes": n, "peak_rss_mb": peak,
                              "rss_before_mb": rss_before, "peak_mark_reset": reset}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def measure_memory(methods: Sequence[str], size: int, device: torch.device, threads: int, cap: int = 0) -> None:
    """One subprocess per method (:func:`memory_child`); print and emit the peaks against the 4 GB target."""
    with tempfile.TemporaryDirectory(prefix="fewshot_bench_mem_") as tmp:
        make_store(classes=STORE_CLASSES, per_class=STORE_PER_CLASS, size=size, directory=Path(tmp))  # once, shared
        print(f"\n-- memory of one default (auto) batch of episodes at {size} px, 5-way 5-shot 15-query, {device.type}, "
              f"{threads} thread(s); a fresh process per method; target < {MEMORY_TARGET_MB / 1024:.0f} GB")
        for name in methods:
            args = [str(Path(__file__).resolve()), "--memory-child", name, "--memory-size", str(size),
                    "--store-dir", tmp, "--device", device.type, "--threads", str(threads), "--memory-cap", str(cap)]
            try:
                r = run_child(args, timeout=1800)
            except Exception as exc:
                print(f"   {name:17s} failed: {exc}")
                emit("29d", f"{name}: peak memory of a default evaluation batch, {size} px ({device.type})",
                     None, f"< {MEMORY_TARGET_MB} MiB", "MISSED", reason="failed")
                continue
            figure = float(r["cuda_peak_mb"]) if device.type == "cuda" else float(r["peak_rss_mb"])
            met = verdict(figure, MEMORY_TARGET_MB, "<")
            rise = float(r["peak_rss_mb"]) - float(r["rss_before_mb"])
            capped = f", first {r['episodes']}" if r["batched"] and int(r["episodes"]) < int(r["default_batch"]) else ""
            path = f"batch {r['default_batch']}{capped}" if r["batched"] else "per-episode only"
            print(f"   {name:17s} {path:20s} peak RSS {float(r['peak_rss_mb']):7.0f} MiB (rise over the set-up "
                  f"{rise:6.0f} MiB)" + (f"   CUDA peak {float(r['cuda_peak_mb']):7.0f} MiB" if device.type == "cuda" else "")
                  + f"   target < {MEMORY_TARGET_MB} MiB: {met}", flush=True)
            emit("29d", f"{name}: peak {'CUDA memory' if device.type == 'cuda' else 'RSS'} of a default evaluation batch "
                 f"({path}), {size} px", {"median": figure, "min": figure, "max": figure}, f"< {MEMORY_TARGET_MB} MiB",
                 met, **r)


def time_head_protocol(dims: Sequence[int], episodes: int, reps: int) -> None:
    """Chen et al.'s head protocol alone on given features (the issue's orientation figure: 159 ms per episode one
    by one, 11-12 ms batched, 800-d): ``fit_linear_head`` per episode vs ``fit_linear_heads`` on ``episodes`` at
    once, 5-way 5-shot, SGD lr 0.01 momentum 0.9 dampening 0.9 weight decay 1e-3, batch 4, 100 passes."""
    from fewshot_nsl.methods.batched import fit_linear_heads, linear_init, replay_draws, support_orders
    from fewshot_nsl.methods.head_training import fit_linear_head

    cpu = torch.device("cpu")
    sgd = dict(lr=0.01, momentum=0.9, dampening=0.9, weight_decay=1e-3)
    for dim in dims:
        feats = torch.randn(episodes, 25, dim)
        labels = torch.arange(5).repeat_interleave(5).expand(episodes, 25).contiguous()
        seeds = list(range(episodes))

        def each() -> None:
            for e in seeds:
                torch.manual_seed(e)
                fit_linear_head(torch.nn.Linear(dim, 5), feats[e], labels[e], epochs=100, batch_size=4,
                                shuffle_full_batch=True, **sgd)

        def batched() -> None:
            w, b, orders = replay_draws(seeds, cpu, lambda: (*linear_init(dim, 5, cpu, torch.float32),
                                                           support_orders(25, 100, 4, cpu, True)))
            fit_linear_heads(w, b, feats, labels, orders, batch_size=4, **sgd)

        times = interleaved({"each": each, "batched": batched}, reps)
        r = ratio_stats(times["batched"], times["each"])
        per = {k: 1e3 * stats(v)["median"] / episodes for k, v in times.items()}
        met = verdict(r["median"], 0.1, "<=")
        print(f"   head protocol alone, {dim}-d features, {episodes} episodes: per-episode {per['each']:.2f} ms/ep, "
              f"batched {per['batched']:.2f} ms/ep, batched / per-episode x{r['median']:.3f} "
              f"[{r['min']:.3f}-{r['max']:.3f}]   target <= 0.1: {met}")
        emit("29a", f"Chen head protocol alone ({dim}-d features): batched / per-episode, {torch.get_num_threads()} "
             f"thread(s)", r, "<= 0.1", met)


def _best_gflops(fn: Callable[[], object], flop: float, reps: int) -> float:
    """GFLOPS of ``fn`` (``flop`` per call): best of three timings of ``reps`` calls, after three warm-up calls."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, time.perf_counter() - t0)
    return flop * reps / best / 1e9


def peak_gflops(reps: int = 10) -> Dict[str, float]:
    """The float32 throughput of the fastest kernels torch has here, at the current thread count (GFLOPS): a
    1024x1024 matrix product (the BLAS, MKL in the CPU wheel) and a 3x3 convolution of 128 channels on 32
    channels-last 32x32 maps (oneDNN); ``"peak"`` is the larger, the arithmetic ceiling of any path. They can
    differ by 2x: on the AMD EPYC of ``RESULTS.md`` MKL runs its AVX2 code (about 108 GFLOPS per core) and oneDNN
    its AVX-512 code (about 240)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x = torch.randn(32, 128, 32, 32).contiguous(memory_format=torch.channels_last)
    w = torch.randn(128, 128, 3, 3)
    out = {"gemm": _best_gflops(lambda: a @ b, 2 * 1024**3, 2 * reps),
           "conv": _best_gflops(lambda: F.conv2d(x, w, None, 1, 1), 2 * 32 * 32 * 32 * 128 * 128 * 9, reps)}
    out["peak"] = max(out.values())
    return out


def time_floor(name: str, store, lst, size: int, device: torch.device, episodes: int = 5) -> None:
    """How low batched / per-episode could go for ``name`` on this CPU: the FLOPs of one per-episode evaluation
    (:func:`bench_dynamic_flops.count_flops`: forward and backward of every test-time step, the in-place GEMMs
    included), its time, and the peak of the fastest float32 kernel at this thread count (:func:`peak_gflops`). A
    batched path does the same arithmetic (each episode its own weights), so its time is at least FLOPs / peak, and
    its ratio at least (per-episode GFLOPS) / (peak GFLOPS)."""
    from bench_dynamic_flops import count_flops

    from fewshot_nsl.data.episodes import Materialiser

    method = build(name, size, device)
    if method.image_embedding() is not None:  # the batched path embeds each image once: less arithmetic, no floor
        print(f"   {name:17s} embeds each distinct image once when batched: it does less arithmetic than the "
              f"per-episode path (no floor)", flush=True)
        return
    mat = Materialiser(store, size, device)
    tensors = [mat.load(mat.stage(lst.episode(i))) for i in range(episodes)]

    def run(t) -> None:
        with torch.no_grad():
            method.fit_support(t.support_x, t.support_y)
            method(t.query_x)

    flops, _, _ = count_flops(lambda: run(tensors[0]))  # with the in-place GEMMs the default registry misses
    t0 = time.perf_counter()
    for t in tensors:
        run(t)
    seconds = (time.perf_counter() - t0) / episodes
    achieved, peaks = flops / seconds / 1e9, peak_gflops()
    peak = peaks["peak"]
    floor = achieved / peak
    target = TARGETS.get(name)
    print(f"   {name:17s} {flops / 1e9:6.2f} GFLOP per episode, per-episode {1e3 * seconds:7.1f} ms = {achieved:5.1f} "
          f"GFLOPS; peak {peak:5.1f} GFLOPS (oneDNN conv {peaks['conv']:.0f}, BLAS GEMM {peaks['gemm']:.0f}); "
          f"lowest possible batched / per-episode {floor:.2f}"
          + (f" (target <= {target}: {'reachable' if floor <= target else 'out of reach on this CPU'})"
             if target is not None else ""), flush=True)
    emit("29a", f"{name}: arithmetic floor of batched / per-episode, {size} px, {torch.get_num_threads()} thread(s)",
         {"median": floor, "min": floor, "max": floor}, _goal(name), None, gflop_per_episode=flops / 1e9,
         per_episode_ms=1e3 * seconds, achieved_gflops=achieved, peak_gflops=peak, conv_gflops=peaks["conv"],
         gemm_gflops=peaks["gemm"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=600, help="episodes per evaluation (0: skip the timing)")
    p.add_argument("--size", type=int, default=42, help="image side of the timed evaluations")
    p.add_argument("--threads", default="", help="torch threads, comma-separated to time at several (default: torch's)")
    p.add_argument("--reps", type=int, default=1, help="repetitions of the alternating pair")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--memory", action="store_true", help="also the peak memory of a default batch (subprocess per method)")
    p.add_argument("--memory-size", type=int, default=84)
    p.add_argument("--floor", action="store_true",
                   help="also each method's arithmetic floor: FLOPs of a per-episode evaluation against the float32 peak")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--store-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--memory-cap", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    threads = [int(t) for t in args.threads.split(",") if t.strip()] or [torch.get_num_threads()]
    if args.memory_child:
        torch.set_num_threads(threads[0])
        print(json.dumps(memory_child(args.memory_child, args.memory_size, args.store_dir, device, args.memory_cap), default=float))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from fewshot_nsl.registry import list_methods

    unknown = [m for m in methods if m not in list_methods()]
    if unknown:
        print(f"error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(list_methods())}", file=sys.stderr)
        return 2
    if args.quick:
        args.episodes, args.size, args.reps, args.memory_size, args.memory_cap = 3, 16, 1, 16, 4
    print_settings("bench_batched_eval: issue 29", device=device.type)
    with tempfile.TemporaryDirectory(prefix="fewshot_bench_eval_") as tmp:
        if args.episodes > 0:
            store, lst = store_and_episodes(args.size, args.episodes, Path(tmp))
            for t in threads:
                torch.set_num_threads(t)
                print(f"\n-- evaluate(), {args.episodes} episodes 5-way 5-shot 15-query at {args.size} px, {device.type}, "
                      f"{t} thread(s): per-episode path (batch_episodes=1) vs batched (auto), alternating, {args.reps} "
                      f"repetition(s); ratio median [min-max]; untrained weights (the work does not depend on them)")
                for name in methods:
                    time_method(name, store, lst, args.episodes, args.size, args.reps, device, Path(tmp))
                if device.type == "cpu" and "finetune" in methods:
                    time_head_protocol((16,) if args.quick else (128, 800), min(args.episodes, 100), args.reps)
                if args.floor and device.type == "cpu":
                    print(f"\n-- arithmetic floor, {t} thread(s): FLOPs of one per-episode evaluation (5 episodes timed) "
                          f"against the float32 peak (the faster of the BLAS GEMM and a oneDNN convolution)")
                    for name in methods:
                        time_floor(name, store, lst, args.size, device, episodes=min(5, args.episodes))
        if args.memory:
            measure_memory(methods, args.memory_size, device, threads[0], args.memory_cap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
