"""A NaN/Inf loss stops training naming method and step, keeping the last checkpoint;
non-finite logits mark an episode as failed instead of being averaged in."""
import csv
from pathlib import Path

import pandas as pd
import pytest
import torch

from fewshot_nsl.config import resolve_config
from fewshot_nsl.errors import NumericalError
from fewshot_nsl.registry import load_plugins
from fewshot_nsl.runner import run, run_dir_of

# Faulty methods live in their own plugin folder so that other tests never see them.
load_plugins([Path(__file__).parent / "faulty_plugins"])



def tiny(tmp_path, method, **extra):
    cli = {"method": method, "profile": "smoke", "dataset": "tiny", "ways": 5, "shots": 2, "image_size": 16,
           "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"), "device": "cpu",
           "eval": {"episodes": 8, "queries": 3}}
    cli.update(extra)
    return resolve_config(cli)


def test_nan_training_loss_names_method_and_step_and_keeps_checkpoint(tmp_path):
    cfg = tiny(tmp_path, "nan_after_steps", episodic={"steps": 6, "checkpoint_every": 2},
               method_options={"nan_from_call": 4})
    with pytest.raises(NumericalError, match=r"nan_after_steps training loss at step 4 of 6 \(training episode 4, classes "):
        run(cfg, progress=False, log=lambda *a: None)
    ckpt = torch.load(run_dir_of(cfg) / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2  # the last good checkpoint is there to resume from
    assert not (tmp_path / "results" / "leaderboard.csv").exists()


def test_nonfinite_logits_mark_the_episode_and_count_as_wrong(tmp_path):
    cfg = tiny(tmp_path, "nan_logits_on_odd_episodes")
    row = run(cfg, progress=False, log=lambda *a: None)
    with open(run_dir_of(cfg) / "episodes.csv") as f:
        rows = list(csv.DictReader(f))
    status = [r["status"] for r in sorted(rows, key=lambda r: int(r["episode"]))]
    assert status == ["ok", "nonfinite"] * 4
    assert row["episodes_failed"] == 4 and row["episodes"] == 8  # failed episodes are in the count, as wrong
    assert row["accuracy"] == row["accuracy"]  # not NaN
    df = pd.read_csv(tmp_path / "results" / "leaderboard.csv")
    assert int(df.loc[0, "episodes_failed"]) == 4
