"""The Ray executor (a 2-CPU local cluster) reproduces the local executor's results exactly:
training and evaluation-shard tasks, shards merged in episode order, interrupted shards salvaged."""
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from fewshot_nsl.errors import ConfigError
from fewshot_nsl.grid import Cell, run_grid

REPO = Path(__file__).resolve().parent.parent
COMPARE = ["episode", "accuracy", "correct", "total", "status"]


def cli(results):
    return {"profile": "smoke", "dataset": "tiny", "ways": 5, "image_size": 16, "results_dir": str(results),
            "device": "cpu", "eval": {"episodes": 10, "queries": 5}}


def test_missing_ray_gives_one_clear_line(monkeypatch):
    from fewshot_nsl.executors import RayExecutor

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"--executor ray needs Ray: pip install -e '\.\[ray\]'"):
        RayExecutor()


def test_ray_executor_reproduces_local_results(tmp_path):
    pytest.importorskip("ray")
    from fewshot_nsl.executors import LocalExecutor, RayExecutor

    cells = [Cell("protonet", "cnn4", 2), Cell("nearest_neighbor", "cnn4", 2)]
    quiet = lambda *a: None  # noqa: E731
    threads = torch.get_num_threads()
    try:
        run_grid(cells, cli(tmp_path / "local"), executor=LocalExecutor(threads=1), progress=False, log=quiet)
    finally:
        torch.set_num_threads(threads)
    local = pd.read_csv(tmp_path / "local" / "leaderboard.csv")

    # Ray results dir: protonet already trained and half evaluated by an interrupted earlier run
    # (4 rows in episodes.csv, rows 5-6 left in a shard file), nearest_neighbor from scratch.
    proto = local.loc[local["method"] == "protonet", "run_id"].iloc[0]
    src, dst = tmp_path / "local" / "runs" / proto, tmp_path / "ray" / "runs" / proto
    dst.mkdir(parents=True)
    for f in ("identity.json", "config.yaml", "method.pt", "train.json"):
        shutil.copy(src / f, dst / f)
    lines = (src / "episodes.csv").read_text().splitlines(keepends=True)
    (dst / "episodes.csv").write_text("".join(lines[:5]))
    (dst / "shards").mkdir()
    (dst / "shards" / "000005-000006.csv").write_text(lines[0] + "".join(lines[6:8]))

    log = []
    res = run_grid(cells, cli(tmp_path / "ray"),
                   executor=RayExecutor(num_cpus=2, threads=1, shard_size=3, plugin_dirs=[REPO / "tests" / "plugins"]),
                   progress=False, log=log.append)
    assert res.count("ran") == 2, log
    assert any(line.startswith("ray: 2 run(s) on a cluster with 2 CPU(s)") for line in log), log
    ray_lb = pd.read_csv(tmp_path / "ray" / "leaderboard.csv")
    cols = ["method", "accuracy", "ci95", "ci95_t", "episodes", "episode_hash", "config_hash", "run_id", "params",
            "diff_vs_ref", "p_vs_ref", "threads"]
    pd.testing.assert_frame_equal(ray_lb[cols], local[cols])
    assert list(ray_lb["executor"]) == ["ray", "ray"] and list(local["executor"]) == ["local", "local"]
    for rid in local["run_id"]:
        a = pd.read_csv(tmp_path / "ray" / "runs" / rid / "episodes.csv", dtype=str)
        b = pd.read_csv(tmp_path / "local" / "runs" / rid / "episodes.csv", dtype=str)
        assert list(a["episode"]) == [str(i) for i in range(10)]
        pd.testing.assert_frame_equal(a[COMPARE], b[COMPARE])
        assert not (tmp_path / "ray" / "runs" / rid / "shards").exists()
    nn = local.loc[local["method"] == "nearest_neighbor", "run_id"].iloc[0]
    wa = torch.load(tmp_path / "ray" / "runs" / nn / "method.pt", weights_only=True)
    wb = torch.load(tmp_path / "local" / "runs" / nn / "method.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # pretrained in a Ray task: same weights
