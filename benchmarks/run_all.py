"""Run every benchmark and print every figure, then one summary line per target.

Each script runs in its own process (a clean allocator and thread pool per benchmark); its output
is shown as it comes, and the summary at the end lists each target's measured ratio as the median
[min-max] over repetitions, the goal, and whether it is met.

Usage::

    python benchmarks/run_all.py                       # everything (about an hour on a 2-core CPU)
    python benchmarks/run_all.py --quick               # tiny sizes: checks that every script runs
    python benchmarks/run_all.py --only episodes,harness --json results.json
    python benchmarks/run_all.py --threads 1           # OMP_NUM_THREADS for the benchmark processes
    python benchmarks/run_all.py --only quick_grid     # the whole quick CNN-4 grid in one command (~1 h; not by default)

Measure on a quiet machine: with more runnable processes than cores, multi-threaded torch ops
wait for descheduled worker threads and every timing (and many ratios) degrades; the load average
is printed with each script's settings.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULT_PREFIX, settings  # noqa: E402

#: name -> (script, arguments, arguments with --quick)
BENCHMARKS: Dict[str, Tuple[str, List[str], List[str]]] = {
    "settings": ("bench_settings.py", [], ["--quick"]),
    "episodes": ("bench_episodes.py", [], ["--quick"]),
    "static": ("bench_static_nsn.py", [], ["--quick"]),
    "dynamic": ("bench_dynamic_nsn.py", [], ["--quick"]),
    "sphere": ("bench_sphere_conv.py", [], ["--quick"]),
    "dynamic_targets": ("bench_dynamic_targets.py", ["--compile", "--compile-sizes", "42"], ["--quick"]),
    "nsconv": ("bench_nsconv.py", ["--reps", "5"],
               ["--reps", "1", "--batch", "2", "--size", "16", "--layer-batch", "2", "--layer-size", "8"]),
    "maml": ("bench_maml_targets.py", [], ["--quick"]),
    "maml_steps": ("bench_maml.py", ["--meta-batch", "4", "--reps", "2"],
                   ["--size", "16", "--inner-steps", "1", "--meta-batch", "1", "--reps", "1"]),
    "harness": ("bench_harness.py", [], ["--quick"]),
    "scale": ("bench_scale.py", [], ["--quick"]),
    "host_syncs": ("bench_host_syncs.py", [], ["--quick"]),
    "input_pipeline": ("bench_input_pipeline.py", [], ["--quick"]),
    "batched_eval": ("bench_batched_eval.py", ["--threads", "1,2", "--memory", "--floor"], ["--quick", "--memory", "--floor"]),
    "dynamic_flops": ("bench_dynamic_flops.py", [], ["--quick"]),
    # both cores, one cell per core (22.9 min measured; one process, --executor local --threads 2: 27.7 min)
    "quick_grid": ("bench_quick_grid.py", ["--executor", "ray", "--threads", "1"], ["--quick"]),
}
#: Run only when named in ``--only`` (the whole quick grid takes about an hour).
ON_REQUEST = ("quick_grid",)


def run_one(name: str, quick: bool, env: Dict[str, str], timeout: float) -> Tuple[int, List[dict], float]:
    script, full, small = BENCHMARKS[name]
    cmd = [sys.executable, str(HERE / script), *(small if quick else full)]
    print(f"\n##### {name}: {' '.join(cmd[1:])}", flush=True)
    rows: List[dict] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=HERE.parent)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if line.startswith(RESULT_PREFIX):
                rows.append(json.loads(line[len(RESULT_PREFIX):]))
            elif "UserWarning" not in line and not line.lstrip().startswith("warnings.warn"):
                print(line, end="", flush=True)
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = -9
    return code, rows, time.perf_counter() - t0


def measured(r: dict) -> str:
    v = r["value"]
    if v is None:  # nothing measured (e.g. a method without the path a target is about): the reason instead
        return f"n/a ({r.get('reason', 'not measured')})"
    fmt = (lambda x: f"{100 * x:.2f}%") if "share" in r["name"] else (lambda x: f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}")
    return f"{fmt(v['median'])} [{fmt(v['min'])}-{fmt(v['max'])}]"


def summary(rows: List[dict]) -> None:
    print("\n##### summary (ratio: median [min-max] over repetitions)")
    print(f"{'target':8s} {'figure':92s} {'measured':>26s} {'goal':>22s}  met")
    for r in rows:
        if r["target"] in ("settings", "6"):
            continue
        print(f"{r['target']:8s} {r['name'][:92]:92s} {measured(r):>26s} {r['goal']:>22s}  {r['met'] or '(info)'}")


def markdown(rows: List[dict], info: Dict[str, object]) -> str:
    """The summary as markdown tables (targets; PyTorch settings; scale)."""
    out = [f"Measured {info['date']} on a {info['machine']}, torch {info['torch']}, {info['threads']} torch thread(s), "
           f"{info.get('clock', 'wall')} clock, 1-min load average {info['loadavg_1min']} at the start.", "",
           "| target | figure | measured: median [min-max] | goal | met |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["target"] not in ("settings", "6"):
            out.append(f"| {r['target']} | {r['name']} | {measured(r)} | {r['goal']} | {r['met'] or 'info'} |")
    settings_rows = [r for r in rows if r["target"] == "settings"]
    if settings_rows:
        out += ["", "| PyTorch setting | variant / default: median [min-max] |", "| --- | --- |"]
        out += [f"| {r['name']} | {measured(r)} |" for r in settings_rows]
    scale = [r for r in rows if r["target"] == "6" and "episodes" in r]
    if scale:
        sizes = sorted({r["size"] for r in scale})
        out += ["", "| episodes | " + " | ".join(f"{s}x{s}: wall s (ms/episode)" for s in sizes) + " |",
                "| --- | " + " | ".join("---" for _ in sizes) + " |"]
        for n in sorted({r["episodes"] for r in scale}):
            cells = {r["size"]: r for r in scale if r["episodes"] == n}
            out.append(f"| {n} | " + " | ".join(
                f"{cells[s]['value']['median']:.1f} ({cells[s]['ms_per_episode']:.1f})" if s in cells else "-" for s in sizes) + " |")
    quick = [r for r in rows if r["target"] == "6" and "episodes" not in r]
    if quick:
        out += ["", "| quick profile on glyphs | wall s |", "| --- | --- |"]
        out += [f"| {r['name'].split(': ', 1)[1]} | {r['value']['median']:.0f} |" for r in quick]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: every script runs in seconds")
    p.add_argument("--only", default=",".join(n for n in BENCHMARKS if n not in ON_REQUEST),
                   help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: all but {','.join(ON_REQUEST)}, "
                        "which runs only when named)")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the benchmarks (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: time by process CPU time (use with --threads 1 on a machine loaded by others)")
    p.add_argument("--json", type=Path, help="also write settings and every result row to this file")
    p.add_argument("--markdown", type=Path, help="also write the summary as markdown tables to this file")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per script")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    env = {**os.environ, "FEWSHOT_BENCH_RESULTS": "1", "PYTHONWARNINGS": "ignore"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    env["FEWSHOT_BENCH_CLOCK"] = args.clock
    info = settings()
    if args.threads:
        info["threads"] = args.threads  # what the benchmark processes use (this one keeps torch's default)
    info["clock"] = args.clock
    print("fewshot-nsl benchmarks: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    rows: List[dict] = []
    failed = []
    for name in names:
        code, got, secs = run_one(name, args.quick, env, args.timeout)
        for r in got:
            r["benchmark"] = name
        rows.extend(got)
        print(f"##### {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {secs:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    summary(rows)
    if failed:
        print(f"failed: {', '.join(failed)}")
    if args.markdown:
        args.markdown.write_text(markdown(rows, info))
        print(f"markdown summary written to {args.markdown}")
    if args.json:
        args.json.write_text(json.dumps({"settings": info, "quick": args.quick, "results": rows}, indent=1, default=float))
        print(f"results written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
