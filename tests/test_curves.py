"""Training curves (issue 12 item 5): rows every N steps, kept across a resume, CSV/PNG/TensorBoard."""
from __future__ import annotations

import sys
import types

import torch

from fewshot_nsl import curves
from fewshot_nsl.config import resolve_config
from fewshot_nsl.runner import build_method, load_store
from fewshot_nsl.training import meta_train, pretrain, set_seed


def test_rows_every_n_steps_are_means():
    c = curves.StageCurve("episodic", total_steps=250)
    assert c.every == 3  # ceil(250 / 100)
    for step in range(1, 251):
        c.update(step, loss=float(step), accuracy=0.5)
    assert [r["step"] for r in c.rows[:2]] == [3, 6] and c.rows[-1]["step"] == 250
    assert c.rows[0]["loss"] == 2.0 and c.rows[0]["accuracy"] == 0.5  # mean of steps 1-3
    assert len(c.rows) == 84


def _cfg(tmp_path, method, steps):
    cli = {"method": method, "profile": "smoke", "dataset": "tiny", "image_size": 16, "ways": 5, "shots": 1,
           "backbone_options": {"filters": 4}, "cache_dir": str(tmp_path / "cache"), "device": "cpu",
           "episodic": {"steps": steps, "checkpoint_every": 1, "queries": 3}, "pretrain": {"max_steps": 3}}
    return resolve_config(cli)


def test_episodic_curve_survives_a_resume(tmp_path):
    ckpt, rows = tmp_path / "checkpoint.pt", []
    cfg = _cfg(tmp_path, "protonet", 2)
    store = load_store(cfg)
    set_seed(0)
    meta_train(build_method(cfg), store, cfg, torch.device("cpu"), ckpt, progress=False, curve=rows)
    assert [r["step"] for r in rows] == [1, 2]
    resumed: list = []
    cfg4 = _cfg(tmp_path, "protonet", 4)  # the same checkpoint, trained on to step 4
    meta_train(build_method(cfg4), store, cfg4, torch.device("cpu"), ckpt, progress=False, curve=resumed)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] and resumed[:2] == rows
    assert all(r["accuracy"] is not None for r in resumed)  # protonet's loss goes through its logits


def test_pretraining_curve_comes_back_from_the_cache(tmp_path):
    cfg = _cfg(tmp_path, "nearest_neighbor", 1)
    store = load_store(cfg)
    trained, cached = [], []
    for rows in (trained, cached):
        set_seed(0)
        info = pretrain(build_method(cfg), store, cfg, torch.device("cpu"), {}, tmp_path / "cache", progress=False,
                        curve=rows)
    assert info["cached"] and [r["stage"] for r in trained] == ["pretrain"] * 3 and cached == trained


def test_files_written_and_tensorboard_only_when_installed(tmp_path, monkeypatch):
    rows = [{"stage": "pretrain", "step": 1, "loss": 2.0, "accuracy": 0.25},
            {"stage": "episodic", "step": 1, "loss": 1.5, "accuracy": None}]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed: skipped silently
    out = curves.write_curves(tmp_path, rows, title="run")
    assert set(out) == {"csv", "png"} and not (tmp_path / "tensorboard").exists()
    assert curves.read_curve(out["csv"]) == rows
    assert out["png"].read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob("*.tmp*"))
    scalars = []

    class Writer:  # stands in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    assert "tensorboard" in curves.write_curves(tmp_path, rows)
    assert scalars == [("pretrain/loss", 2.0, 1), ("pretrain/accuracy", 0.25, 1), ("episodic/loss", 1.5, 1)]
    empty = curves.write_curves(tmp_path / "none", []) if (tmp_path / "none").mkdir() is None else None
    assert curves.read_curve(empty["csv"]) == []  # a method without training still gets both files
