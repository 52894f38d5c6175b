"""Target 6 (scale): ProtoNet evaluation wall time vs episodes and image size; quick-profile wall time per method.

* table 1: :func:`fewshot_nsl.evaluation.evaluate` of ProtoNet (CNN-4, 32 filters, untrained: the
  time does not depend on the weights) on a memory-mapped synthetic store (20 classes x 600 images,
  built at the image size, as the suite's stores are), 5-way 5-shot 15-query, for ``--episodes``
  (100, 600, 2000) x ``--sizes`` (32, 84); one run per cell, wall time and ms per episode;
* table 2: the quick-profile wall time (training + evaluation) of each method on ``glyphs``, read
  from ``results/leaderboard.csv`` (column ``wall_time_s``); with ``--run-missing``, methods
  without a row are run first (``run_benchmarks.py --profile quick``; minutes per method).

Usage::

    python benchmarks/bench_scale.py [--episodes 100,600,2000] [--sizes 32,84] [--quick]
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_episodes import timed_evaluation  # noqa: E402
from common import ROOT, emit, make_store, print_settings  # noqa: E402

LEADERBOARD = ROOT / "results" / "leaderboard.csv"


def scale_table(episodes, sizes, classes: int, per_class: int) -> dict:
    print("\n-- ProtoNet (CNN-4, 32 filters) evaluation wall time, 5-way 5-shot 15-query (one run per cell)")
    print(f"   {'episodes':>8s} " + " ".join(f"{f'{s}x{s} s':>10s} {'ms/ep':>7s} {'data %':>6s}" for s in sizes))
    table = {}
    stores = {s: make_store(classes=classes, per_class=per_class, size=s) for s in sizes}
    for s in sizes:  # warm-up (first-call set-up of the conv primitives), not in the table
        timed_evaluation(stores[s], 2, s)
    for n in episodes:
        cells = []
        for s in sizes:
            wall, data = timed_evaluation(stores[s], n, s)
            table[(n, s)] = wall
            cells.append(f"{wall:10.1f} {1e3 * wall / n:7.1f} {100 * data / wall:6.2f}")
            emit("6", f"ProtoNet evaluation wall time, {n} episodes, {s}x{s}", {"median": wall, "min": wall, "max": wall},
                 "table", None, episodes=n, size=s, ms_per_episode=1e3 * wall / n, data_share=data / wall)
        print(f"   {n:8d} " + " ".join(cells), flush=True)
    return table


def leaderboard_rows(path: Path = LEADERBOARD, dataset: str = "glyphs", profile: str = "quick"):
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("dataset") == dataset and r.get("profile") == profile]


def methods_table(run_missing: bool) -> None:
    rows = leaderboard_rows()
    if run_missing:
        sys.path.insert(0, str(ROOT))
        from fewshot_nsl.registry import list_methods, load_plugins

        load_plugins([ROOT / "baselines"])
        have = {r["method"] for r in rows}
        for m in list_methods():
            if m not in have:
                print(f"   running {m} (quick profile on glyphs) ...", flush=True)
                subprocess.run([sys.executable, str(ROOT / "run_benchmarks.py"), "--method", m, "--profile", "quick"],
                               cwd=ROOT, check=False)
        rows = leaderboard_rows()
    print(f"\n-- quick-profile wall time per method on glyphs (synthetic; from {LEADERBOARD.relative_to(ROOT)})")
    if not rows:
        print("   no glyphs/quick rows yet: run `python run_benchmarks.py --grid configs/table6.yaml --profile quick` "
              "(or this script with --run-missing)")
        return
    print(f"   {'method':18s} {'backbone':8s} {'shots':>5s} {'train s':>9s} {'eval s':>8s} {'wall s':>8s}")
    for r in sorted(rows, key=lambda r: (r["method"], r["backbone"], int(float(r["shots"])))):
        def num(k):
            try:
                return f"{float(r.get(k)):.1f}"
            except (TypeError, ValueError):
                return "-"
        print(f"   {r['method']:18s} {r['backbone']:8s} {r['shots']:>5s} {num('train_time_s'):>9s} {num('eval_time_s'):>8s} {num('wall_time_s'):>8s}")
        try:
            wall = float(r["wall_time_s"])
            emit("6", f"quick-profile wall time on glyphs: {r['method']} {r['backbone']} {r['shots']}-shot",
                 {"median": wall, "min": wall, "max": wall}, "table", None)
        except (TypeError, ValueError, KeyError):
            pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", default="100,600,2000")
    p.add_argument("--sizes", default="32,84")
    p.add_argument("--run-missing", action="store_true", help="run methods missing from the leaderboard (slow)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = p.parse_args(argv)
    print_settings("bench_scale: target 6")
    classes, per_class = 20, 600
    if args.quick:
        args.episodes, args.sizes, classes, per_class = "2,4", "16", 6, 25
    scale_table([int(n) for n in args.episodes.split(",")], [int(s) for s in args.sizes.split(",")], classes, per_class)
    methods_table(args.run_missing and not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
