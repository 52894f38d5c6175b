"""End-to-end runs on the tiny dataset, in process: rows, resume, reports."""
import csv

import pandas as pd
import pytest

from fewshot_nsl.config import resolve_config
from fewshot_nsl.reporting import render_reports
from fewshot_nsl.runner import run


def tiny_cfg(tmp_path, method, **extra):
    cli = {
        "method": method, "profile": "smoke", "dataset": "tiny", "ways": 5, "shots": 2, "image_size": 16,
        "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"), "device": "cpu",
        "eval": {"episodes": 12, "queries": 5},
    }
    cli.update(extra)
    return resolve_config(cli)


def episode_rows(cfg):
    from fewshot_nsl.runner import run_id

    path = f"{cfg.results_dir}/runs/{run_id(cfg)}/episodes.csv"
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method", ["protonet", "nearest_neighbor"])
def test_run_writes_a_leaderboard_row_above_chance(tmp_path, method):
    cfg = tiny_cfg(tmp_path, method)
    row = run(cfg, progress=False, log=lambda *a: None)
    assert row["episodes"] == 12 and row["episodes_failed"] == 0
    assert 30.0 < row["accuracy"] < 100.0  # chance is 20%
    assert 0 < row["ci95"] < row["ci95_t"] + 1e-9 or row["ci95"] == 0
    df = pd.read_csv(tmp_path / "results" / "leaderboard.csv")
    assert len(df) == 1 and df.loc[0, "method"] == method
    for col in ["episode_hash", "dataset_fingerprint", "config_hash", "params", "wall_time_s", "peak_memory_mb",
                "device", "git_commit", "torch_version", "seeds"]:
        assert pd.notna(df.loc[0, col]), col
    assert len(episode_rows(cfg)) == 12
    assert (tmp_path / "results" / "table6.md").read_text().count(method) >= 1
    assert (tmp_path / "results" / "leaderboard.png").stat().st_size > 1000


def test_rerun_resumes_with_identical_results_and_no_duplicates(tmp_path):
    cfg = tiny_cfg(tmp_path, "protonet")
    first = run(cfg, progress=False, log=lambda *a: None)
    rows = episode_rows(cfg)
    path = f"{cfg.results_dir}/runs/" + first["run_id"] + "/episodes.csv"
    # simulate a kill after 5 episodes, in the middle of writing the 6th line
    with open(path, "w") as f:
        f.write(",".join(rows[0].keys()) + "\n")
        for r in rows[:5]:
            f.write(",".join(r.values()) + "\n")
        f.write("5,33.3")
    second = run(cfg, progress=False, log=lambda *a: None)
    again = episode_rows(cfg)
    assert [r["episode"] for r in again] == [str(i) for i in range(12)]
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]
    assert second["accuracy"] == first["accuracy"]
    assert len(pd.read_csv(tmp_path / "results" / "leaderboard.csv")) == 1


def test_leaderboard_keeps_one_row_per_cell_and_reports_paper_value(tmp_path):
    run(tiny_cfg(tmp_path, "protonet"), progress=False, log=lambda *a: None)
    run(tiny_cfg(tmp_path, "protonet", shots=1), progress=False, log=lambda *a: None)
    run(tiny_cfg(tmp_path, "protonet", seed=1), progress=False, log=lambda *a: None)  # replaces the seed-0 row
    df = pd.read_csv(tmp_path / "results" / "leaderboard.csv")
    assert sorted(df["shots"].tolist()) == [1, 2]
    md = render_reports(tmp_path / "results")["markdown"].read_text()
    assert "| protonet | cnn4 |" in md and "68.20 ± 0.66" in md and "synthetic" in md


def test_config_hash_ignores_training_sections_the_method_does_not_use():
    """Changing the pretraining leaves an episodic-only method's run id (and so its finished runs)
    alone, and changing episodic training leaves a pretraining-only method's alone; a method that
    uses both stages sees both."""
    from fewshot_nsl.config import resolve_config
    from fewshot_nsl.runner import config_hash, run_id

    def cfg(method, **extra):
        return resolve_config({"method": method, "profile": "smoke", **extra})

    more_pretraining = {"pretrain": {"epochs": 99}}
    more_episodes = {"episodic": {"steps": 999}}
    assert run_id(cfg("maml")) == run_id(cfg("maml", **more_pretraining))
    assert run_id(cfg("maml")) != run_id(cfg("maml", **more_episodes))
    assert config_hash(cfg("nearest_neighbor")) == config_hash(cfg("nearest_neighbor", **more_episodes))
    assert config_hash(cfg("nearest_neighbor")) != config_hash(cfg("nearest_neighbor", **more_pretraining))
    assert config_hash(cfg("meta_static_nsn")) != config_hash(cfg("meta_static_nsn", **more_pretraining))
    assert config_hash(cfg("meta_static_nsn")) != config_hash(cfg("meta_static_nsn", **more_episodes))
    with_pretraining = {"method_options": {"pretrained_backbone": True}}
    assert config_hash(cfg("protonet", **with_pretraining)) != config_hash(
        cfg("protonet", **with_pretraining, **more_pretraining))
