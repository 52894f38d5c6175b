"""Kill a real benchmark process (SIGKILL) during meta-training and during evaluation, restart it,
and check it ends with exactly what an uninterrupted run writes: same weights, same episode rows
(no duplicates, no gaps), same leaderboard numbers."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# Long enough to be caught mid-way by a poller, still a few seconds: 80 ProtoNet steps
# (checkpoint every 5) and 80 test episodes on the tiny dataset, evaluated 4 at a time (ProtoNet's batched
# evaluation would otherwise take all 80 in one call, written at once).
N_EPISODES = 80
CONFIG = ("episodic: {steps: 80, checkpoint_every: 5, queries: 5}\n"
          f"eval: {{episodes: {N_EPISODES}, queries: 5, batch_episodes: 4}}\n")
COMPARE = ["episode", "accuracy", "correct", "total", "status"]


def command(results, cfg_file, *extra):
    return [sys.executable, str(REPO / "run_benchmarks.py"), "--plugins", str(REPO / "tests" / "plugins"),
            "--dataset", "tiny", "--image-size", "16", "--profile", "smoke", "--shots", "2",
            "--config", str(cfg_file), "--results-dir", str(results), "--no-progress", *extra]


def env(tmp_path):
    # one torch thread: results are compared bit for bit, and many threads crawl on a busy machine
    return dict(os.environ, FEWSHOT_NSL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")


def run_to_end(cmd, tmp_path):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def kill_when(cmd, tmp_path, ready, what):
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` holds; fail if it finished first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path, env=env(tmp_path))
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return
            if proc.poll() is not None:
                pytest.fail(f"the run finished before it could be killed {what}: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.002)
        pytest.fail(f"never reached the point to kill {what}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_dir(results):
    dirs = list((Path(results) / "runs").glob("tiny_protonet_*"))
    return dirs[0] if dirs else None


def data_rows(csv_path):
    try:
        return max(0, Path(csv_path).read_text().count("\n") - 1)
    except OSError:
        return 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    cfg = tmp / "cfg.yaml"
    cfg.write_text(CONFIG)
    run_to_end(command(tmp / "results", cfg), tmp)
    return tmp / "results"


def assert_same_as_reference(results, reference):
    got, ref = run_dir(results), run_dir(reference)
    assert got.name == ref.name
    a, b = pd.read_csv(got / "episodes.csv", dtype=str), pd.read_csv(ref / "episodes.csv", dtype=str)
    assert list(a["episode"]) == [str(i) for i in range(N_EPISODES)]  # no duplicates, no gaps, in order
    pd.testing.assert_frame_equal(a[COMPARE], b[COMPARE])  # identical per-episode results
    wa = torch.load(got / "method.pt", weights_only=True)
    wb = torch.load(ref / "method.pt", weights_only=True)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # identical weights
    la, lb = pd.read_csv(Path(results) / "leaderboard.csv"), pd.read_csv(Path(reference) / "leaderboard.csv")
    assert len(la) == 1
    for col in ["accuracy", "ci95", "ci95_t", "episodes", "episode_hash", "config_hash", "run_id"]:
        assert la.loc[0, col] == lb.loc[0, col], col
    assert not list(got.glob("*.tmp*"))


def test_sigkill_during_meta_training_resumes_from_checkpoint(tmp_path, reference):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    results = tmp_path / "results"

    def mid_training():
        d = run_dir(results)
        return d is not None and (d / "checkpoint.pt").is_file() and not (d / "method.pt").exists()

    kill_when(command(results, cfg), tmp_path, mid_training, "during meta-training")
    d = run_dir(results)
    step = torch.load(d / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step < 80 and not (d / "method.pt").exists() and not (results / "leaderboard.csv").exists()
    out = run_to_end(command(results, cfg), tmp_path)
    assert "protonet cnn4 5-way 2-shot on tiny" in out
    assert_same_as_reference(results, reference)
    assert pd.read_csv(results / "leaderboard.csv").loc[0, "resumed"]


def test_sigkill_during_evaluation_resumes_from_last_episode(tmp_path, reference):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    results = tmp_path / "results"
    # training is not what this test is about: start from the reference's trained method
    src = run_dir(reference)
    dst = results / "runs" / src.name
    dst.mkdir(parents=True)
    for f in ("identity.json", "config.yaml", "method.pt", "train.json"):
        shutil.copy(src / f, dst / f)

    kill_when(command(results, cfg), tmp_path, lambda: data_rows(dst / "episodes.csv") >= 10, "during evaluation")
    n = data_rows(dst / "episodes.csv")
    assert 10 <= n < N_EPISODES and not (dst / "summary.json").exists()
    run_to_end(command(results, cfg), tmp_path)
    assert_same_as_reference(results, reference)


@pytest.mark.slow  # ~15-40 s: four grid processes; the per-run kill tests above cover the mechanism
def test_sigkill_of_a_grid_then_restart_completes_identically(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("grid: {method: [protonet, nearest_neighbor], backbone: [cnn4], shots: [2]}\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("eval: {episodes: 40, queries: 5}\n")
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run_to_end(command(ref, cfg, "--grid", str(grid)), tmp_path)
    kill_when(command(killed, cfg, "--grid", str(grid)), tmp_path,
              lambda: (killed / "leaderboard.csv").is_file(), "after the first cell")
    assert len(pd.read_csv(killed / "leaderboard.csv")) < 2
    out = run_to_end(command(killed, cfg, "--grid", str(grid)), tmp_path)
    assert "complete for config" in out
    a = pd.read_csv(killed / "leaderboard.csv")
    b = pd.read_csv(ref / "leaderboard.csv")
    cols = ["method", "accuracy", "ci95", "episodes", "episode_hash", "config_hash", "run_id", "diff_vs_ref", "p_vs_ref"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    for rid in a["run_id"]:
        ea = pd.read_csv(killed / "runs" / rid / "episodes.csv", dtype=str)[COMPARE]
        eb = pd.read_csv(ref / "runs" / rid / "episodes.csv", dtype=str)[COMPARE]
        pd.testing.assert_frame_equal(ea, eb)
    out = run_to_end(command(killed, cfg, "--grid", str(grid)), tmp_path)
    assert "nothing to do" in out


def test_pretraining_cache_hit_or_miss_gives_the_same_trained_method(tmp_path):
    """A run restarted after its pretraining was cached must train exactly as the first one did,
    also for methods that draw random numbers after pretraining (new layers, dropout)."""
    from torch import nn

    from fewshot_nsl.config import resolve_config
    from fewshot_nsl.registry import METHODS, get_method_class, register_method
    from fewshot_nsl.runner import execute

    ProtoNet = get_method_class("protonet")

    @register_method("pretrained_proto_for_test")
    class PretrainedProto(ProtoNet):
        """ProtoNet on a pretrained backbone with a freshly initialised projection."""

        training_stages = ("pretrain", "episodic")

        def after_pretrain(self):
            self.proj = nn.Linear(self.backbone.feature_dim(self.image_size), 16)  # random init here

        def fit_support(self, x, y):
            super().fit_support(x, y)
            self.prototypes = self.proj(self.prototypes)

        def forward(self, q):
            return -torch.cdist(self.proj(self.backbone(q)), self.prototypes).pow(2)

    def cfg(name):
        return resolve_config({"method": "pretrained_proto_for_test", "profile": "smoke", "dataset": "tiny",
                               "shots": 2, "image_size": 16, "device": "cpu", "results_dir": str(tmp_path / name),
                               "cache_dir": str(tmp_path / "cache"), "eval": {"episodes": 5, "queries": 5}})

    try:
        first = execute(cfg("a"), progress=False, log=lambda *a: None)   # pretrains (cache miss)
        second = execute(cfg("b"), progress=False, log=lambda *a: None)  # reuses it (cache hit)
    finally:
        METHODS._entries.pop("pretrained_proto_for_test", None)
    assert not first["training"]["pretrain"]["cached"] and second["training"]["pretrain"]["cached"]
    wa = torch.load(tmp_path / "a" / "runs" / first["run_id"] / "method.pt", weights_only=True)
    wb = torch.load(tmp_path / "b" / "runs" / second["run_id"] / "method.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert first["accuracy"] == second["accuracy"]


@pytest.mark.parametrize("when", ["meta-training", "evaluation"])
def test_sigterm_is_handled_like_ctrl_c_and_resumes(tmp_path, reference, when):
    """SIGTERM (a scheduler's stop, ``kill PID``) ends with one ``interrupted:`` line and status
    130, no traceback; the same command then completes with exactly the uninterrupted results."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    results = tmp_path / "results"

    def ready():
        d = run_dir(results)
        if d is None:
            return False
        if when == "meta-training":
            return (d / "checkpoint.pt").is_file() and not (d / "method.pt").exists()
        return data_rows(d / "episodes.csv") >= 10

    proc = subprocess.Popen(command(results, cfg), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path,
                            env=env(tmp_path))
    deadline = time.time() + 300
    try:
        while not ready():
            assert proc.poll() is None, f"finished before the SIGTERM: {proc.stderr.read().decode()[-2000:]}"
            assert time.time() < deadline, f"never reached {when}"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 130, err
    assert len(lines) == 1 and lines[0].startswith("interrupted:") and "Traceback" not in err, err
    assert not list(results.rglob("*.tmp*"))
    run_to_end(command(results, cfg), tmp_path)
    assert_same_as_reference(results, reference)
    assert not list(results.rglob("*.tmp*"))
