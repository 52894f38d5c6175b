"""Issue-29 target of the whole quick CNN-4 grid: every method at 1 and 5 shots, shared pretrainings included, in
one command, within 40 minutes of wall time; broken down per cell.

Runs, as a subprocess, in a fresh results folder (a temporary one unless ``--results-dir``) and a fresh dataset /
pretraining cache (a temporary one unless ``--cache-dir``: the shared pretrainings are part of the grid's time)::

    python run_benchmarks.py --method all --backbone cnn4 --shots 1,5 --profile quick --threads N \\
        --results-dir DIR --cache-dir CACHE --no-progress

then prints one row per cell from ``DIR/leaderboard.csv`` (accuracy, ``train_time_s``, ``eval_time_s``,
``wall_time_s``), their sums, and the command's wall time against the target (<= 40 min; judged only for the full
quick grid). ``--compare DIR2`` also prints each cell's differences against another leaderboard (e.g. the committed
``results/reference/glyphs_quick``): accuracy, the time ratios, and how many episodes' accuracies differ (from the
two runs' ``episodes.csv``). ``--report-only`` reads an existing ``--results-dir`` instead of running the grid.

The full grid takes about an hour on a 2-core CPU: run it on a quiet machine. ``--quick`` checks the script on two
methods with the smoke profile and a few episodes (seconds).

Usage::

    python benchmarks/bench_quick_grid.py [--threads 2] [--executor local|ray] [--results-dir DIR] [--cache-dir DIR]
        [--compare DIR2]
    python benchmarks/bench_quick_grid.py --report-only --results-dir results/reference/glyphs_quick
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, emit, print_settings, verdict  # noqa: E402

#: Issue 29's target for the whole quick CNN-4 grid (seconds of wall time, one command).
TARGET_S = 40 * 60
#: What ``--quick`` runs instead of the full grid.
QUICK = {"methods": "protonet,finetune", "profile": "smoke", "episodes": 4}
#: Columns that make a leaderboard row one cell (the grid's key, less what one grid holds fixed).
CELL = ("dataset", "method", "backbone", "ways", "shots", "profile", "image_size")

Cell = Tuple[str, ...]


def read_leaderboard(directory: Path) -> Dict[Cell, Dict[str, str]]:
    """The rows of ``directory/leaderboard.csv`` by cell (:data:`CELL`)."""
    path = directory / "leaderboard.csv"
    if not path.is_file():
        raise SystemExit(f"error: no leaderboard at {path}; give the results folder of a finished grid")
    with path.open(newline="") as f:
        return {tuple(r.get(k, "") for k in CELL): r for r in csv.DictReader(f)}


#: What two rows of one cell must share for their episodes to be paired by index (the same test episodes).
SAME_EPISODES = ("episode_hash", "dataset_fingerprint", "split", "precision")


def _episodes_key(row: Dict[str, str], key: str) -> str:
    """``row[key]`` of :data:`SAME_EPISODES`; rows written before the precision option ran in fp32."""
    return row.get(key) or ("fp32" if key == "precision" else "")


def episode_accuracies(directory: Path, row: Dict[str, str]) -> Optional[Dict[str, float]]:
    """Episode -> accuracy (%) averaged over the row's seeds (``run_id`` is ``;``-separated for several), from the
    run folders behind ``row`` (``runs/<run_id>/episodes.csv``); None if one is absent."""
    ids = [r for r in (row.get("run_id") or "").split(";") if r]
    per_run = []
    for rid in ids:
        path = directory / "runs" / rid / "episodes.csv"
        if not path.is_file():
            return None
        with path.open(newline="") as f:
            per_run.append({r["episode"]: float(r["accuracy"]) if r.get("status") == "ok" else 0.0
                            for r in csv.DictReader(f)})
    if not per_run:
        return None
    common = set.intersection(*(set(p) for p in per_run))
    return {e: sum(p[e] for p in per_run) / len(per_run) for e in common}


def _f(row: Dict[str, str], key: str) -> float:
    try:
        return float(row.get(key) or "nan")
    except ValueError:
        return float("nan")


def _order(cell: Cell) -> Tuple:
    return cell[1], int(cell[4]) if cell[4].isdigit() else 0, cell


def print_table(rows: Dict[Cell, Dict[str, str]]) -> Dict[str, float]:
    """One line per cell; returns the sums of the three time columns."""
    print(f"\n-- per cell (seconds; from leaderboard.csv)")
    print(f"   {'method':18s} {'shots':>5s} {'accuracy':>9s} {'train_time_s':>13s} {'eval_time_s':>12s} {'wall_time_s':>12s}")
    sums = {"train_time_s": 0.0, "eval_time_s": 0.0, "wall_time_s": 0.0}
    for cell in sorted(rows, key=_order):
        r = rows[cell]
        print(f"   {r['method']:18s} {r['shots']:>5s} {_f(r, 'accuracy'):9.2f} {_f(r, 'train_time_s'):13.1f} "
              f"{_f(r, 'eval_time_s'):12.1f} {_f(r, 'wall_time_s'):12.1f}")
        for k in sums:
            v = _f(r, k)
            sums[k] += v if v == v else 0.0
    print(f"   {'sum':18s} {'':5s} {'':9s} {sums['train_time_s']:13.1f} {sums['eval_time_s']:12.1f} "
          f"{sums['wall_time_s']:12.1f}   ({sums['wall_time_s'] / 60:.1f} min)")
    return sums


def print_compare(rows: Dict[Cell, Dict[str, str]], here: Path, other_rows: Dict[Cell, Dict[str, str]], other: Path) -> None:
    """Per-cell differences against another leaderboard: accuracy, time ratios, episodes whose accuracy differs."""
    print(f"\n-- against {other} (this / other; accuracy difference in points; episodes: differing of common)")
    print(f"   {'method':18s} {'shots':>5s} {'acc diff':>9s} {'train':>8s} {'eval':>8s} {'wall':>8s} {'episodes differing':>20s}")
    for cell in sorted(rows, key=_order):
        r, o = rows[cell], other_rows.get(cell)
        if o is None:
            print(f"   {r['method']:18s} {r['shots']:>5s}   (no such cell in {other})")
            continue

        def ratio(key: str) -> str:
            a, b = _f(r, key), _f(o, key)
            return f"x{a / b:.2f}" if b > 0 and a == a else "-"

        mine, theirs = episode_accuracies(here, r), episode_accuracies(other, o)
        unlike = [k for k in SAME_EPISODES if _episodes_key(r, k) != _episodes_key(o, k)]
        if unlike:  # other test episodes (or precision): pairing them by index would compare unrelated episodes
            eps = f"not paired: {', '.join(unlike)} differ"
        elif mine is None or theirs is None:
            eps = "-"
        else:
            common = sorted(set(mine) & set(theirs))
            differ = sum(1 for e in common if abs(mine[e] - theirs[e]) > 1e-9)
            eps = f"{differ} of {len(common)}"
        print(f"   {r['method']:18s} {r['shots']:>5s} {_f(r, 'accuracy') - _f(o, 'accuracy'):+9.2f} {ratio('train_time_s'):>8s} "
              f"{ratio('eval_time_s'):>8s} {ratio('wall_time_s'):>8s} {eps:>20s}")
    missing = [c for c in other_rows if c not in rows and c[2] == "cnn4"]
    if missing:
        print(f"   cells of {other} not run here: " + ", ".join(f"{c[1]} {c[4]}-shot" for c in sorted(missing, key=_order)))


def run_grid(args, results: Path, cache: Path) -> Tuple[int, float]:
    """Run the grid command; ``(exit code, wall seconds)``."""
    cmd = [sys.executable, str(ROOT / "run_benchmarks.py"), "--method", args.methods, "--backbone", "cnn4",
           "--shots", args.shots, "--profile", args.profile, "--threads", str(args.threads),
           "--results-dir", str(results), "--cache-dir", str(cache), "--no-progress", "--executor", args.executor]
    if args.n_episodes:
        cmd += ["--n-episodes", str(args.n_episodes)]
    print("   " + " ".join(str(c) for c in cmd[1:]), flush=True)
    t0 = time.perf_counter()
    code = subprocess.run(cmd, cwd=ROOT).returncode
    return code, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="--threads of the grid command (the reference used 2)")
    p.add_argument("--results-dir", type=Path, help="keep the grid's results here (a new folder; default: temporary)")
    p.add_argument("--cache-dir", type=Path, help="dataset / pretraining cache (default: a fresh temporary one)")
    p.add_argument("--compare", type=Path, metavar="DIR2", help="also print per-cell differences against DIR2's leaderboard")
    p.add_argument("--report-only", action="store_true", help="read an existing --results-dir instead of running")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="--executor of the grid command: local (one cell after another, --threads each; the reference) "
                        "or ray (as many cells at once as the machine's cores hold --threads each)")
    p.add_argument("--methods", default="all", help=argparse.SUPPRESS)
    p.add_argument("--shots", default="1,5", help=argparse.SUPPRESS)
    p.add_argument("--profile", default="quick", help=argparse.SUPPRESS)
    p.add_argument("--n-episodes", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="two methods, smoke profile, a few episodes (checks the script)")
    args = p.parse_args(argv)
    if args.quick:
        args.methods, args.profile, args.n_episodes = QUICK["methods"], QUICK["profile"], QUICK["episodes"]
    if args.compare is not None and not (args.compare / "leaderboard.csv").is_file():
        print(f"error: --compare {args.compare} holds no leaderboard.csv; give a results folder", file=sys.stderr)
        return 2
    full = (args.methods, args.shots, args.profile, args.n_episodes) == ("all", "1,5", "quick", 0)
    print_settings("bench_quick_grid: issue 29", grid_threads=args.threads, grid_executor=args.executor)
    tmp = tempfile.TemporaryDirectory(prefix="fewshot_bench_grid_")
    try:
        results = args.results_dir or Path(tmp.name) / "results"
        if args.report_only:
            if args.results_dir is None:
                print("error: --report-only needs --results-dir (the folder to read)", file=sys.stderr)
                return 2
            wall = None
        else:
            if (results / "leaderboard.csv").exists():
                print(f"error: {results} already holds a leaderboard; give a new folder (the grid is timed from scratch)",
                      file=sys.stderr)
                return 2
            cache = args.cache_dir or Path(tmp.name) / "cache"
            print(f"\n-- the grid in one command (results {results}, cache {cache})", flush=True)
            code, wall = run_grid(args, results, cache)
            if code != 0:
                print(f"error: the grid command failed (exit {code}); its output is above", file=sys.stderr)
                return 1
        rows = {c: r for c, r in read_leaderboard(results).items() if c[2] == "cnn4" and c[5] == args.profile}
        sums = print_table(rows)
        figure = wall if wall is not None else sums["wall_time_s"]
        what = "the command's wall time" if wall is not None else "the summed wall_time_s (no command timed)"
        met = verdict(figure, TARGET_S, "<=") if full else None
        print(f"\n   {len(rows)} cells; {what}: {figure:.0f} s = {figure / 60:.1f} min   target <= {TARGET_S // 60} min: "
              + (met if met else "(not the full quick grid: no verdict)"))
        emit("29b", f"quick CNN-4 grid ({len(rows)} cells), {what}, {args.executor} executor, {args.threads} thread(s)",
             {"median": figure, "min": figure, "max": figure}, f"<= {TARGET_S} s", met, cells=len(rows),
             summed_wall_time_s=sums["wall_time_s"], summed_train_time_s=sums["train_time_s"],
             summed_eval_time_s=sums["eval_time_s"])
        if args.compare is not None:
            print_compare(rows, results, read_leaderboard(args.compare), args.compare)
    finally:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
