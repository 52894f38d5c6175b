"""Every benchmark script runs at tiny sizes and prints its figures (no timing is asserted)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
from run_all import BENCHMARKS  # noqa: E402

#: What each script must print (its figures), at least.
EXPECT = {
    "settings": ["channels_last", "1 thread"],
    "episodes": ["speed-up of ours (materialise)", "data handling share"],
    "static": ["folded / plain", "static NSN dns / plain", "static NSN uns / plain"],
    "dynamic": ["ns_conv2d / conv2d", "speed-up over the unfold reference", "peak", "dynamic DNS CNN-4 / plain"],
    "nsconv": ["dynamic dns", "reference"],
    "maml": ["time ours / learn2learn", "memory ours / learn2learn", "saved-for-backward"],
    "maml_steps": ["ours-2nd", "l2l-2nd"],
    "sphere": ["function / composed-padded", "4 predictors"],
    "dynamic_targets": ["dynamic DNS eager / plain eager", "target <= 2.0x", "dynamic / plain", "target <= 1.5x"],
    "harness": ["harness throughput / bare throughput"],
    "scale": ["evaluation wall time", "quick-profile wall time"],
    "host_syncs": ["synchronising calls per step", "synchronising calls per episode", "outside logging"],
    "input_pipeline": ["data time / step time with prefetch", "prefetch off", "prefetch on"],
    "batched_eval": ["batched / per-episode", "episodes differing", "peak RSS", "target < 4096 MiB",
                     "lowest possible batched / per-episode"],
    "dynamic_flops": ["FLOP ratio", "time / FLOP ratio", "counter check on the DNS taps", "DNS authors w64"],
    "quick_grid": ["per cell", "train_time_s", "the command's wall time", "target <= 40 min"],
}


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "TMPDIR": str(tmp_path), "FEWSHOT_BENCH_RESULTS": "1"}


def test_every_script_is_in_run_all():
    scripts = {p.name for p in BENCH.glob("bench_*.py")}
    assert scripts <= {script for script, _, _ in BENCHMARKS.values()}
    assert set(EXPECT) == set(BENCHMARKS)


#: Other engineers' scripts, each a loop of fresh processes (minutes under load): run with ``-m slow``.
#: Their workers are exercised by the fast tests too (``maml`` runs ``bench_maml.py``'s workers).
SLOW = {"nsconv", "maml_steps"}
#: ``episodes`` runs inside ``test_run_all_summarises_and_writes_json``.
PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in BENCHMARKS if n != "episodes"]


@pytest.mark.parametrize("name", PARAMS)
def test_benchmark_runs_quick_and_prints_figures(name, tmp_path):
    script, _, quick = BENCHMARKS[name]
    out = subprocess.run([sys.executable, str(BENCH / script), *quick], capture_output=True, text=True,
                         env=_env(tmp_path), timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for text in EXPECT[name]:
        assert text in out.stdout, f"{script} did not print {text!r}:\n{out.stdout[-2000:]}"
    assert not re.search(r"\bnan\b", out.stdout, re.IGNORECASE), out.stdout[-2000:]


def test_run_all_summarises_and_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--quick", "--only", "episodes", "--json", str(path)],
                         capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "##### summary" in out.stdout
    for text in EXPECT["episodes"]:
        assert text in out.stdout
    rows = json.loads(path.read_text())["results"]
    assert {r["target"] for r in rows} == {"1a", "1b"}
    assert all({"median", "min", "max"} <= set(r["value"]) for r in rows)


def test_quick_grid_reports_and_compares_a_leaderboard(tmp_path):
    """``--report-only`` on the committed reference: every cell, the sums, and against itself no episode differs."""
    ref = BENCH.parent / "results" / "reference" / "glyphs_quick"
    out = subprocess.run([sys.executable, str(BENCH / "bench_quick_grid.py"), "--report-only", "--results-dir", str(ref),
                          "--compare", str(ref)], capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "20 cells; the summed wall_time_s" in out.stdout and "target <= 40 min: " in out.stdout
    assert out.stdout.count(" 0 of 600") == 20, out.stdout[-3000:]
    row = next(json.loads(line.split(" ", 1)[1]) for line in out.stdout.splitlines() if line.startswith("BENCH_RESULT"))
    assert row["target"] == "29b" and row["cells"] == 20 and row["met"] in ("MET", "MISSED")


@pytest.mark.parametrize("script,args", [
    ("bench_batched_eval.py", ["--quick", "--methods", "finetune,nosuch"]),
    ("bench_quick_grid.py", ["--report-only"]),
    ("bench_quick_grid.py", ["--quick", "--compare", "no/such/folder"]),
])
def test_bad_arguments_give_one_error_line(script, args, tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                         env=_env(tmp_path), timeout=300)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
