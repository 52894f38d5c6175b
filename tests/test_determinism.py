"""Determinism: what ``--deterministic`` switches on, and bit-identical CPU results across runs.

(Local vs Ray executor is checked in ``test_ray_executor.py``; killed-and-resumed vs uninterrupted
runs in ``test_resume_kill.py``.)
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from fewshot_nsl import cli
from fewshot_nsl.training import set_seed

REPO = Path(__file__).resolve().parent.parent
TINY = ["--plugins", str(REPO / "tests" / "plugins"), "--dataset", "tiny", "--image-size", "16"]
COMPARE = ["episode", "accuracy", "correct", "total", "status"]


@pytest.fixture
def restore_torch_flags(monkeypatch):
    """Put torch's global determinism switches back after the test."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def test_set_seed_deterministic_sets_every_switch(restore_torch_flags):
    torch.backends.cudnn.benchmark = True
    set_seed(3, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()  # a kernel without a deterministic version warns
    assert torch.backends.cudnn.deterministic is True
    assert torch.backends.cudnn.benchmark is False
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    a = torch.rand(3)
    set_seed(3, deterministic=True)
    assert torch.equal(a, torch.rand(3))


def test_set_seed_without_deterministic_resets_the_switches(restore_torch_flags):
    set_seed(0, deterministic=True)
    set_seed(0, deterministic=False)  # the next run of a grid in the same process
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic is False and torch.backends.cudnn.benchmark is False


def test_user_cublas_workspace_setting_is_kept(restore_torch_flags, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    set_seed(0, deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def _run(tmp_path: Path, name: str, *extra: str) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("episodic: {steps: 3, queries: 3}\n")
    results = tmp_path / name
    argv = ["--results-dir", str(results), "--cache-dir", str(tmp_path / f"cache-{name}"), "--no-progress",
            "--profile", "smoke", *TINY, "--method", "protonet", "--shots", "1", "--n-episodes", "6",
            "--queries", "3", "--config", str(cfg), "--threads", "1", *extra]
    assert cli.main(argv) == 0
    (run,) = (results / "runs").iterdir()
    return run


def test_two_cpu_runs_are_bit_identical_and_deterministic_flag_reaches_the_run(
        tmp_path, restore_torch_flags, monkeypatch):
    import fewshot_nsl.process_setup as process_setup

    calls = []
    real = process_setup.set_seed
    monkeypatch.setattr(process_setup, "set_seed",
                        lambda seed, det=False: (calls.append((seed, det)), real(seed, det))[1])
    threads = torch.get_num_threads()
    try:
        a = _run(tmp_path, "a")
        b = _run(tmp_path, "b")
        c = _run(tmp_path, "c", "--deterministic")
    finally:
        torch.set_num_threads(threads)
    assert calls == [(0, False), (0, False), (0, True)]
    assert torch.are_deterministic_algorithms_enabled()  # left on by the --deterministic run
    ea, eb, ec = (pd.read_csv(r / "episodes.csv", dtype=str)[COMPARE] for r in (a, b, c))
    pd.testing.assert_frame_equal(ea, eb)  # same seed, config, machine: same bits
    wa, wb = (torch.load(r / "method.pt", weights_only=True) for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the deterministic switches change nothing on CPU (its kernels already are)
    pd.testing.assert_frame_equal(ea, ec)
