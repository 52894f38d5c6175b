"""Grids: table6.yaml, skipping complete cells, unregistered methods, seeds, paired columns, reports,
--compare, and concurrent leaderboard writers. In process on the tiny dataset (fast)."""
import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from fewshot_nsl.cli import main
from fewshot_nsl.grid import load_grid
from fewshot_nsl.reporting import KEY, read_leaderboard, upsert_row

REPO = Path(__file__).resolve().parent.parent
TINY = ["--plugins", str(REPO / "tests" / "plugins"), "--dataset", "tiny", "--image-size", "16",
        "--profile", "smoke", "--n-episodes", "6", "--queries", "5", "--no-progress"]


def cli(tmp_path, capsys, *args):
    threads = torch.get_num_threads()
    try:  # one thread: fast on a busy machine; restored for the tests that follow
        code = main(["--results-dir", str(tmp_path / "results"), "--threads", "1", *TINY, *args])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return code, out.out, out.err


def episodes(tmp_path, run_id):
    return pd.read_csv(tmp_path / "results" / "runs" / run_id / "episodes.csv")


def test_table6_grid_lists_every_implemented_row_for_1_and_5_shots():
    name, cells = load_grid(REPO / "configs" / "table6.yaml")
    assert name == "table6" and len(cells) == 20
    pairs = {(c.method, c.backbone) for c in cells}
    assert pairs == {("finetune", "cnn4"), ("nearest_neighbor", "cnn4"), ("matchingnet", "cnn4"), ("protonet", "cnn4"),
                     ("maml", "cnn4"), ("relationnet", "cnn4"), ("static_nsn", "cnn4"), ("meta_static_nsn", "cnn4"),
                     ("dynamic_nsn", "cnn4"), ("dynamic_nsn", "cnn9")}
    assert {(m, b, s) for m, b in pairs for s in (1, 5)} == {(c.method, c.backbone, c.shots) for c in cells}
    from fewshot_nsl.reporting import paper_value

    assert paper_value("dynamic_nsn", "cnn9", 5, 5) == (77.44, 0.63)
    assert paper_value("protonet", "cnn4", 5, 5) == (68.20, 0.66)
    assert paper_value("protonet", "cnn4", 5, 1) == (None, None)  # Table 6 has no 1-shot values


def test_grid_skips_unregistered_then_second_invocation_does_nothing(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("rows:\n"
                    "  - {method: protonet, backbone: cnn4, shots: 2}\n"
                    "  - {method: nearest_neighbor, backbone: cnn4, shots: 2}\n"
                    "  - {method: not_yet_written_nsn, backbone: cnn4, shots: 2}\n")
    code, out, err = cli(tmp_path, capsys, "--grid", str(grid), "--dry-run")
    assert code == 0 and out.count("to run: 1 of 1 seed(s)") == 2 and not (tmp_path / "results" / "runs").exists()
    code, out, err = cli(tmp_path, capsys, "--grid", str(grid))
    assert code == 0, err
    assert "not_yet_written_nsn cnn4 2-shot: method 'not_yet_written_nsn' is not registered (yet); skipped" in out
    assert "protonet cnn4 5-way 2-shot on tiny" in out and "2 cell(s) run" in out
    df = read_leaderboard(tmp_path / "results" / "leaderboard.csv")
    assert sorted(df["method"]) == ["nearest_neighbor", "protonet"]
    runs = tmp_path / "results" / "runs"
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}

    code, out, err = cli(tmp_path, capsys, "--grid", str(grid))
    assert code == 0, err
    assert "nothing to do: all 2 runnable cell(s) are already complete" in out
    assert out.count("complete for config") == 2
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == stamps  # nothing rewritten
    again = read_leaderboard(tmp_path / "results" / "leaderboard.csv")
    pd.testing.assert_frame_equal(df, again)

    # a changed config (here: more episodes) is a different cell config: it runs again
    code, out, _ = cli(tmp_path, capsys, "--grid", str(grid), "--method", "protonet", "--n-episodes", "7")
    assert "1 cell(s) run" in out
    # a lost leaderboard is rebuilt from the runs' CSVs, without training or evaluating
    (tmp_path / "results" / "leaderboard.csv").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("method.pt")}
    code, out, _ = cli(tmp_path, capsys, "--grid", str(grid))
    assert "2 re-aggregated" in out
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("method.pt")} == stamps
    rebuilt = read_leaderboard(tmp_path / "results" / "leaderboard.csv")
    assert rebuilt["accuracy"].tolist() == df["accuracy"].tolist()


def test_seeds_give_one_row_with_seed_std_and_episode_ci(tmp_path, capsys):
    code, out, err = cli(tmp_path, capsys, "--method", "protonet", "--shots", "2", "--seeds", "0,1,2")
    assert code == 0, err
    df = read_leaderboard(tmp_path / "results" / "leaderboard.csv")
    assert len(df) == 1
    row = df.iloc[0]
    run_ids = row["run_id"].split(";")
    assert row["seeds"] == "0,1,2" and row["n_seeds"] == 3 and len(run_ids) == 3
    mat = np.stack([episodes(tmp_path, r)["accuracy"].to_numpy() for r in run_ids])
    seed_means = mat.mean(axis=1)
    assert row["accuracy"] == pytest.approx(seed_means.mean(), abs=1e-3)
    assert row["seed_std"] == pytest.approx(seed_means.std(ddof=1), abs=1e-3)
    per_episode = mat.mean(axis=0)
    assert row["ci95"] == pytest.approx(1.96 * per_episode.std() / np.sqrt(len(per_episode)), abs=1e-3)
    assert row["episodes"] == 6
    summaries = [json.loads((tmp_path / "results" / "runs" / r / "summary.json").read_text()) for r in run_ids]
    assert {s["config_hash"] for s in summaries} == {row["config_hash"]}  # one cell config for all seeds
    assert len({s["run_config_hash"] for s in summaries}) == 3
    assert row["wall_time_s"] == pytest.approx(sum(s["wall_time_s"] for s in summaries), abs=0.05)
    assert "seed sd" in (tmp_path / "results" / "table6.md").read_text()


def test_provenance_columns_are_filled(tmp_path, capsys):
    code, _, err = cli(tmp_path, capsys, "--method", "nearest_neighbor", "--shots", "2")
    assert code == 0, err
    row = read_leaderboard(tmp_path / "results" / "leaderboard.csv").iloc[0]
    for col in ["config_hash", "episode_hash", "dataset_fingerprint", "git_commit", "git_dirty", "torch_version",
                "device", "device_name", "threads", "seeds", "params", "wall_time_s", "train_time_s", "eval_time_s",
                "peak_memory_mb", "executor", "pretrain_world_size", "python_version", "finished_at", "run_id"]:
        assert pd.notna(row[col]), col
    assert len(row["config_hash"]) == 16 and len(row["episode_hash"]) == 16 and len(row["git_commit"]) >= 7
    assert row["params"] > 0 and 0 < row["peak_memory_mb"] < 50_000
    doc = (REPO / "results" / "README.md").read_text()
    for col in read_leaderboard(tmp_path / "results" / "leaderboard.csv").columns:
        assert f"`{col}`" in doc, f"results/README.md does not explain column {col}"


def test_paired_columns_compare_and_report(tmp_path, capsys):
    code, _, err = cli(tmp_path, capsys, "--method", "protonet,nearest_neighbor", "--shots", "2", "--n-episodes", "12")
    assert code == 0, err
    df = read_leaderboard(tmp_path / "results" / "leaderboard.csv").set_index("method")
    nn_ids, pn_ids = df.loc["nearest_neighbor", "run_id"], df.loc["protonet", "run_id"]
    a = episodes(tmp_path, nn_ids)["accuracy"].to_numpy()
    b = episodes(tmp_path, pn_ids)["accuracy"].to_numpy()
    r = df.loc["nearest_neighbor"]
    assert r["ref_method"] == "protonet" and r["ref_backbone"] == "cnn4" and r["n_paired"] == 12
    assert r["diff_vs_ref"] == pytest.approx((a - b).mean(), abs=1e-3)
    assert r["diff_ci95"] == pytest.approx(1.96 * (a - b).std() / np.sqrt(12), abs=1e-3)
    if np.any(a != b):
        assert r["p_vs_ref"] == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-3)
    assert df.loc["protonet", "ref_method"] == "protonet" and pd.isna(df.loc["protonet", "diff_vs_ref"])
    md = (tmp_path / "results" / "table6.md").read_text()
    assert "Δ vs protonet (2-shot)" in md and "reference" in md

    # --compare prints the same paired difference for any two runs
    code, out, err = cli(tmp_path, capsys, "--compare", nn_ids, str(tmp_path / "results" / "runs" / pn_ids))
    assert code == 0, err
    assert f"A - B: {(a - b).mean():+.2f}" in out and "paired t-test" in out and "Wilcoxon" in out
    # runs on different episode lists cannot be paired
    code, _, _ = cli(tmp_path, capsys, "--method", "protonet", "--shots", "1")
    one_shot = read_leaderboard(tmp_path / "results" / "leaderboard.csv").query("shots == 1")["run_id"].iloc[0]
    code, out, err = cli(tmp_path, capsys, "--compare", one_shot, pn_ids)
    assert code == 2 and err.count("\n") == 1 and "different episode lists" in err
    code, out, err = cli(tmp_path, capsys, "--compare", "no_such_run", pn_ids)
    assert code == 2 and "not found" in err

    # reports come back from the CSVs alone, with another reference if asked
    for f in ["table6.md", "summary.md", "summary.html", "leaderboard.png"]:
        (tmp_path / "results" / f).unlink()
    code, out, err = cli(tmp_path, capsys, "--report", "--reference", "nearest_neighbor")
    assert code == 0, err
    for f in ["table6.md", "summary.md", "summary.html", "leaderboard.png"]:
        assert (tmp_path / "results" / f).stat().st_size > 200, f
    df2 = read_leaderboard(tmp_path / "results" / "leaderboard.csv")
    p = df2[(df2["method"] == "protonet") & (df2["shots"] == 2)].iloc[0]
    assert p["ref_method"] == "nearest_neighbor" and p["diff_vs_ref"] == pytest.approx(-r["diff_vs_ref"], abs=1e-3)
    assert "Δ vs nearest_neighbor" in (tmp_path / "results" / "table6.md").read_text()
    assert "<table" in (tmp_path / "results" / "summary.html").read_text()


def test_a_failing_cell_is_reported_and_the_grid_goes_on(tmp_path, capsys):
    from fewshot_nsl.registry import METHODS, register_method

    @register_method("broken_for_test")
    class Broken(__import__("fewshot_nsl.methods", fromlist=["FewShotMethod"]).FewShotMethod):
        """Fails at evaluation."""
        training_stages = ()

        def fit_support(self, x, y):
            raise RuntimeError("boom")

        def forward(self, q):  # registration requires both (never reached: fit_support raises first)
            return q

    grid = tmp_path / "grid.yaml"
    grid.write_text("grid: {method: [broken_for_test, protonet], backbone: [cnn4], shots: [2]}\n")
    try:
        code, out, err = cli(tmp_path, capsys, "--grid", str(grid))
    finally:
        METHODS._entries.pop("broken_for_test", None)
    assert code == 1
    # the method's exception is one line naming the method, the call and the episode (issue 11)
    assert ("FAILED broken_for_test cnn4 5-way 2-shot seed 0: method broken_for_test raised RuntimeError in "
            "fit_support on test episode 0: boom") in out
    assert "protonet cnn4 5-way 2-shot on tiny" in out
    assert err.startswith("error: 1 cell(s) failed")
    assert list(read_leaderboard(tmp_path / "results" / "leaderboard.csv")["method"]) == ["protonet"]


def _writer(args):
    path, worker, n = args
    for i in range(n):
        row = {"dataset": "tiny", "method": f"m{i % 5}", "backbone": "cnn4", "ways": 5, "shots": 1 + (i % 2),
               "profile": "smoke", "accuracy": float(worker * 100 + i), "ci95": 1.0, "episodes": 10,
               "run_id": f"w{worker}_{i}"}
        upsert_row(Path(path), row)
    return worker


def test_concurrent_leaderboard_writers_do_not_corrupt_it(tmp_path):
    path = tmp_path / "leaderboard.csv"
    ctx = mp.get_context("fork")
    with ctx.Pool(4) as pool:
        assert sorted(pool.map(_writer, [(str(path), w, 12) for w in range(4)])) == [0, 1, 2, 3]
    df = read_leaderboard(path)
    assert len(df) == 10  # 5 methods x 2 shots, each written by every worker: one row per key
    assert not df.duplicated(KEY).any()
    assert df["accuracy"].notna().all() and set(df.columns) >= set(KEY)
    assert not list(tmp_path.glob("*.tmp*"))
