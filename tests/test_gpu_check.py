"""``benchmarks/gpu_check.py`` (issue 27, item 5): the prepared GPU check keeps working on the CPU.

The dry run (``--cpu-dry-run``) takes the same code path as the CUDA check at tiny sizes: every section runs
in its own process and reports; the check of a pretraining killed with SIGKILL and resumed must find the
cached weights bit-identical. The orchestration is tested on its own: a hanging section is killed at its
time limit (its subprocesses too) and reported with what it finished, a failing one is reported, not fatal.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCH / "gpu_check.py"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One ``--cpu-dry-run`` (about a minute on an idle core): its exit status, stdout, JSON and report."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    out, raw = tmp / "report.md", tmp / "results.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry-run", "--work", str(tmp / "work"), "--out", str(out),
                           "--json", str(raw)], capture_output=True, text=True, timeout=900, env=_env())
    assert out.is_file() and raw.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(raw.read_text()), out.read_text()


def test_dry_run_reports_every_section(dry_run):
    proc, raw, text = dry_run
    for heading in ("## 1. Device and versions", "## 2. Smoke cell of every method", "## 3. Pretraining killed",
                    "## 4. Training step speed and memory", "## 5. Projected", "## 6. compile on/off and precision"):
        assert heading in text, heading
    assert "CPU DRY RUN" in text and text in proc.stdout  # the report is printed too, labelled as a dry run
    info = raw["versions"]
    assert info["torch"] == torch.__version__ and info["fewshot_nsl"] and "git_commit" in info and info["python"]
    secs = raw["sections"]
    assert list(secs) == list(gpu_check.SECTIONS)
    for name in gpu_check.SECTIONS:
        assert secs[name]["status"] == "ok", (name, secs[name])
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_dry_run_smoke_cells_cover_a_pretraining_and_an_episodic_method(dry_run):
    smoke = dry_run[1]["sections"]["smoke"]["items"]
    passed = [i for i in smoke if i["ok"]]
    assert any("pretrain" in i["stages"] for i in passed) and any("episodic" in i["stages"] for i in passed)
    assert all(i["episodes"] == 2 and i["seconds"] > 0 for i in passed)


def test_dry_run_killed_pretraining_resumes_bit_identically(dry_run):
    (item,) = dry_run[1]["sections"]["resume"]["items"]
    assert item["ok"] and item["identical"] and item["resumed_the_partial"], item
    assert 0 < item["partial_step"] < item["total_steps"] and item["steps"] == item["total_steps"]
    assert item["tensors"] > 0 and item["max_abs_diff"] == 0.0
    assert "| finetune |" in dry_run[2] and "| yes |" in dry_run[2]


def test_dry_run_times_steps_and_projects_the_cells(dry_run):
    raw = dry_run[1]
    cells = raw["sections"]["steps"]["items"]
    assert {c["method"] for c in cells} >= {"finetune", "protonet"}
    for c in cells:
        assert c["ok"] and c["test"]["s"] > 0 and c["test_episodes"] == 600, c
    assert any(c.get("pretrain", {}).get("s", 0) > 0 and c["pretrain_steps"] > 0 for c in cells)
    assert any(c.get("episodic", {}).get("s", 0) > 0 and c["episodic_steps"] > 0 for c in cells)
    proj = raw["projection"]
    assert len(proj["cells"]) == len(cells) and proj["grid_h"] > 0
    assert "Projected total of the 3 measured cells" in dry_run[2]


def test_dry_run_precision_arms(dry_run):
    arms = {i["arm"]: i for i in dry_run[1]["sections"]["precision"]["items"]}
    assert set(arms) == {"fp32_off", "bf16_off"}
    ref = arms["fp32_off"]
    assert ref["ok"] and ref["episodes"] == 3 and ref["step"]["s"] > 0, ref
    bf16 = arms["bf16_off"]
    assert bf16["ok"] and bf16["precision"] == "bf16" and bf16["step"]["s"] > 0, bf16
    assert bf16["paired"]["same_episodes"] <= 3 and abs(bf16["paired"]["diff"]) <= 100
    assert dry_run[2].count("skipped: not in the CPU dry run") == 2  # the compiled arms


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine would start the real check")
def test_without_a_gpu_the_check_refuses_in_one_line():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, env=_env())
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: no CUDA GPU is visible") and "--cpu-dry-run" in lines[0]


@pytest.mark.parametrize("args, words", [(["--sections", "smoke,bogus"], "unknown section(s) bogus"),
                                         (["--cpu-dry-run", "--budget", "0"], "--budget must be a positive")])
def test_bad_arguments_end_in_one_line(args, words):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env=_env())
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr


HANGS = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print("@progress started", flush=True)
print('@result {"ok": true, "child": %d}' % child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.is_file() and status.read_text().split()[2] == "Z")  # a zombie is dead


def test_a_hanging_section_is_killed_at_its_limit_with_its_subprocesses():
    said = []
    t0 = time.perf_counter()
    sec = gpu_check.run_section("steps", [sys.executable, "-c", HANGS], timeout=6, say=said.append)
    assert time.perf_counter() - t0 < 30
    assert sec.status == "timed out" and "6 s" in sec.error
    assert [i["ok"] for i in sec.items] == [True]  # what it finished before the limit is kept
    assert said == ["  started"]
    deadline = time.time() + 10
    while _alive(sec.items[0]["child"]) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(sec.items[0]["child"]), "the section's subprocess survived the kill"


def test_a_failing_section_is_reported_with_its_last_line():
    crash = ("print('@result {\"ok\": false, \"method\": \"protonet\", \"error\": \"boom\"}', flush=True); "
             "raise SystemExit('it broke')")
    sec = gpu_check.run_section("smoke", [sys.executable, "-c", crash], timeout=60, say=lambda line: None)
    assert sec.status == "failed" and "status 1" in sec.error and "it broke" in sec.error
    assert sec.items == [{"ok": False, "method": "protonet", "error": "boom"}]
    plan = gpu_check.dry_run_plan("/nonexistent")
    secs = {name: gpu_check.Section(name, "skipped", error="not selected (--sections)") for name in gpu_check.SECTIONS}
    secs["smoke"] = sec
    text = gpu_check.report(plan, {"torch": torch.__version__}, secs)
    assert "| smoke | **failed**" in text and "| protonet | - | FAIL: boom |" in text
    secs["smoke"].items.append({"ok": True})  # an item the renderer cannot read: that section says so, no crash
    text = gpu_check.report(plan, {"torch": torch.__version__}, secs)
    assert "could not render the smoke results" in text and "## 6. compile on/off" in text


def _cell(method, key=None, pre=None, epi=None, test=1.0, **budget):
    c = {"ok": True, "method": method, "backbone": "cnn4", "shots": 5, "test": {"s": test},
         "pretrain_steps": 0, "episodic_steps": 0, "val_episodes": 0, "test_episodes": 600, **budget}
    if pre is not None:
        c.update(pretrain={"s": pre}, pretrain_key=key)
    if epi is not None:
        c["episodic"] = {"s": epi}
    return c


def test_projection_counts_a_shared_pretraining_once():
    cells = [_cell("finetune", "k1", pre=0.36, pretrain_steps=10000),  # 1 h pretraining + 600 s of test episodes
             _cell("nearest_neighbor", "k1", pre=0.36, pretrain_steps=10000),  # the same pretraining
             _cell("protonet", epi=0.36, episodic_steps=20000, val_episodes=3000),  # 2 h + (3000 + 600) s
             {"ok": False, "method": "relationnet", "backbone": "cnn4", "shots": 5, "error": "x"}]
    proj = gpu_check.project(cells)
    hours = [round(r["hours"], 4) for r in proj["cells"]]
    assert hours == [round(1 + 600 / 3600, 4), round(1 + 600 / 3600, 4), round(2 + 3600 / 3600, 4)]
    assert [r["pretraining_shared"] for r in proj["cells"]] == [False, True, False]
    assert proj["grid_unshared_h"] == pytest.approx(sum(hours), abs=1e-3)
    assert proj["grid_h"] == pytest.approx(sum(hours) - 1, abs=1e-3)  # the second pretraining is not trained again


def test_full_budget_of_paper_cells():
    from fewshot_nsl.config import resolve_config

    proto = resolve_config({"method": "protonet", "shots": 5, "profile": "paper"})
    assert gpu_check.full_budget(proto) == {"pretrain_steps": 0, "episodic_steps": 20000,
                                            "val_episodes": 20000 // 100 * 100, "test_episodes": 600}
    fine = resolve_config({"method": "finetune", "shots": 5, "profile": "paper"})
    assert gpu_check.full_budget(fine)["pretrain_steps"] == 50 * 600  # 50 epochs of 38400 images in batches of 64
