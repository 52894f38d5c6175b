"""The command line: one clear error line for bad input, a working run, --list and --report."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = ["--plugins", str(REPO / "tests" / "plugins"), "--dataset", "tiny", "--image-size", "16"]


def cli(*args, tmp_path, env_cache=None):
    cmd = [sys.executable, str(REPO / "run_benchmarks.py"), "--results-dir", str(tmp_path / "results"),
           "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def assert_one_clear_line(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in err[0], err[0]


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["--method", "protonett"], ["unknown method 'protonett'", "protonet"]),
        (["--backbone", "resnet99", *TINY], ["unknown backbone 'resnet99'", "cnn4"]),
        ([*TINY, "--ways", "9"], ["--ways 9", "lower --ways"]),
        ([*TINY, "--ways", "1"], ["ways must be at least 2"]),
        ([*TINY, "--shots", "40"], ["fewer than shots+queries"]),
        (["--dataset", "miniimagenet", "--data-root", "/nonexistent/mini"], ["/nonexistent/mini"]),
        (["--dataset", "imagenet21k"], ["unknown dataset 'imagenet21k'"]),
        (["--device", "tpu", *TINY], ["unknown device 'tpu'"]),
        (["--config", "/nonexistent.yaml"], ["does not exist"]),
        ([*TINY, "--episodes", "/nonexistent/eps.json"], ["episode list /nonexistent/eps.json does not exist"]),
    ],
)
def test_bad_input_gets_one_clear_line(tmp_path, capsys, args, fragments):
    """In process (fast); the subprocess path is covered below."""
    from fewshot_nsl.cli import main

    code = main(["--results-dir", str(tmp_path / "results"), "--no-progress", *args, "--profile", "smoke"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for f in fragments:
        assert f in err[0], err[0]
    assert not (tmp_path / "results" / "leaderboard.csv").exists()


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    assert_one_clear_line(cli("--method", "nope", tmp_path=tmp_path), "unknown method 'nope'")
    # flags are never abbreviated: '--way 9' must not silently run as '--ways 9'
    assert_one_clear_line(cli("--way", "9", "--dry-run", tmp_path=tmp_path), "unrecognized arguments: --way")


def test_unknown_method_option_in_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method_options: {temprature: 3}\n")
    proc = cli("--config", str(cfg), *TINY, "--profile", "smoke", tmp_path=tmp_path)
    assert_one_clear_line(proc, "temprature", "accepted:", "temperature")


def test_smoke_run_and_report(tmp_path):
    proc = cli("--method", "protonet,nearest_neighbor", "--shots", "1", *TINY, "--profile", "smoke",
               "--n-episodes", "8", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "protonet cnn4 5-way 1-shot on tiny" in proc.stdout
    df = pd.read_csv(tmp_path / "results" / "leaderboard.csv")
    assert sorted(df["method"]) == ["nearest_neighbor", "protonet"]
    assert (df["episodes"] == 8).all() and (df["accuracy"] > 20).all()
    (tmp_path / "results" / "table6.md").unlink()
    proc = cli("--report", tmp_path=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "results" / "table6.md").is_file()


def test_list_shows_methods_backbones_datasets(tmp_path):
    proc = cli("--list", tmp_path=tmp_path)
    assert proc.returncode == 0
    for name in ["protonet", "nearest_neighbor", "cnn4", "cnn9", "glyphs", "miniimagenet", "custom"]:
        assert name in proc.stdout
