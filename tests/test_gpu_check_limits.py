"""``benchmarks/gpu_check.py``: the compiled precision arms cannot starve the rest of the check, and a check that
is stopped keeps every finished section in its report. Sections are replaced by tiny scripts (the real ones are
run by ``tests/test_gpu_check.py``'s dry run)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402


def _script(*results, then: str = "") -> str:
    lines = ["import json, os, signal, sys, time"]
    lines += [f"print('@result ' + json.dumps({r!r}), flush=True)" for r in results]
    return "\n".join(lines + [then])


def _arm(arm, ok=True, **extra):
    precision, compile_setting = arm.split("_")
    item = {"arm": arm, "precision": precision, "compile": compile_setting, "ok": ok, "seconds": 1.0,
            "step": {"s": 0.01, "warmup_s": 0.5, "peak_mb": 10.0, "compiled": compile_setting == "on"}}
    if ok:
        item.update(accuracy=50.0, ci95=1.0, episodes=100, episodes_failed=0, train_time_s=1.0, eval_time_s=1.0)
    item.update(extra)
    return item


def test_compiled_arms_run_after_the_eager_ones_within_their_own_limit(tmp_path):
    """The eager arms finish within their limit; the compiled arms' process (stuck compiling after reporting
    fp32_on's step) is killed at its own, shorter limit: the eager arms' results and the compiled step stay."""
    plan = gpu_check.gpu_plan(str(tmp_path))
    plan.timeouts.update(precision=60, compiled=3)
    eager = _script(_arm("fp32_off", ok=False, error=gpu_check.ACCURACY_PENDING),
                    _arm("bf16_off", ok=False, error=gpu_check.ACCURACY_PENDING),
                    _arm("fp32_off"), _arm("bf16_off", paired={"diff": 0.1, "diff_ci95": 0.5, "p": 0.7,
                                                                "same_episodes": 90}))
    compiled = _script(_arm("fp32_on", ok=False, error=gpu_check.ACCURACY_PENDING), then="time.sleep(120)")
    started = []

    def command(name, plan_file, part=None):
        started.append((name, part))
        return [sys.executable, "-c", eager if part == "eager" else compiled]

    written = []
    t0 = time.perf_counter()
    secs = gpu_check.run_sections(plan, tmp_path / "plan.json", ["precision"], say=lambda line: None,
                                  on_section=lambda s: written.append({k: v.status for k, v in s.items()}),
                                  command=command)
    assert time.perf_counter() - t0 < 40
    assert started == [("precision", "eager"), ("precision", "compiled")]
    sec = secs["precision"]
    assert sec.status == "timed out" and "compiled arms: killed after 3 s" in sec.error, sec.error
    arms = {i["arm"]: i for i in sec.items}
    assert list(arms) == ["fp32_off", "bf16_off", "fp32_on"]  # a later result of an arm replaces its first
    assert arms["fp32_off"]["ok"] and arms["bf16_off"]["ok"] and "error" not in arms["fp32_off"]
    assert arms["fp32_on"]["step"]["s"] > 0 and arms["fp32_on"]["error"] == gpu_check.ACCURACY_PENDING
    # the report was written once the eager arms were done, before any compilation started
    assert written[0]["precision"] == "running" and written[-1]["precision"] == "timed out"
    text = gpu_check.report(plan, {"torch": "x"}, gpu_check.complete(secs))
    assert "| fp32_off |" in text and "| bf16_off |" in text and "+0.10 ± 0.50" in text
    assert "| bf16_on | | | | | | | | | not measured: the section is timed out" in text
    assert "did not finish within the time limit (the step was measured)" in text


def test_compiled_arms_skipped_when_the_budget_is_spent(tmp_path):
    plan = gpu_check.gpu_plan(str(tmp_path))
    plan.budget_s = 6.0
    plan.timeouts.update(precision=60, compiled=60)
    eager = _script(_arm("fp32_off"), _arm("bf16_off"), then="time.sleep(2)")
    secs = gpu_check.run_sections(plan, tmp_path / "plan.json", ["precision"], say=lambda line: None,
                                  command=lambda name, plan_file, part=None: [sys.executable, "-c", eager])
    sec = secs["precision"]
    assert sec.status == "failed" and "compiled arms: skipped, the 6 s budget was spent" in sec.error, sec.error
    assert [i["arm"] for i in sec.items] == ["fp32_off", "bf16_off"]


DATA = {"ok": True, "dataset": "glyphs", "synthetic": True, "images": 10, "image_size": 16, "fingerprint": "f",
        "seconds": 0.1}
SMOKE = {"ok": True, "method": "protonet", "stages": ["episodic"], "accuracy": 40.0, "episodes": 2, "seconds": 1.0}
# the section after smoke: copies the report as it is now, then stops the check (SIGTERM to the parent) and hangs
STOPPER = """
import os, pathlib, shutil, signal, time
shutil.copy(os.environ["GPU_CHECK_TEST_OUT"], os.environ["GPU_CHECK_TEST_SEEN"])
os.kill(os.getppid(), signal.SIGTERM)
time.sleep(120)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_a_stopped_check_keeps_every_finished_section(tmp_path, monkeypatch):
    """The report is rewritten after every section (a later kill of the whole check cannot lose them); SIGTERM
    kills the running section's processes and ends the check with the report of what was finished."""
    out, raw, seen = tmp_path / "report.md", tmp_path / "raw.json", tmp_path / "seen.md"
    monkeypatch.setenv("GPU_CHECK_TEST_OUT", str(out))
    monkeypatch.setenv("GPU_CHECK_TEST_SEEN", str(seen))
    scripts = {"data": _script(DATA), "smoke": _script(SMOKE), "resume": STOPPER}
    monkeypatch.setattr(gpu_check, "child_command",
                        lambda name, plan_file, part=None: [sys.executable, "-c", scripts.get(name, "")])
    monkeypatch.setattr(gpu_check, "versions", lambda: {"torch": "x"})
    code = gpu_check.main(["--cpu-dry-run", "--work", str(tmp_path / "work"), "--out", str(out), "--json", str(raw)])
    assert code == 130
    before_stop = seen.read_text()  # written after smoke, before the stopped section began
    assert "| data | **ok**" in before_stop and "| smoke | **ok**" in before_stop and "| protonet |" in before_stop
    assert "| resume | **not run**" in before_stop
    text = out.read_text()
    assert "| smoke | **ok**" in text and "| resume | **interrupted**" in text and "| steps | **not run**" in text
    secs = json.loads(raw.read_text())["sections"]
    assert list(secs) == list(gpu_check.SECTIONS) and secs["smoke"]["items"][0]["method"] == "protonet"
