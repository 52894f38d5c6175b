"""``fewshot_nsl.benchmark()`` and ``--json`` say when the leaderboard kept another row for a cell.

A run measured on less evidence (fewer episodes or seeds) than the cell's leaderboard row does not replace it
(``leaderboard.upsert_row``). The API still returns the run's own row (what the call measured), but marked:
``on_leaderboard`` is False and ``leaderboard_run_id`` names the run(s) of the row the leaderboard kept; with
``log=None`` a :class:`fewshot_nsl.api.KeptRowWarning` says so too. Rows that are on the leaderboard carry
``on_leaderboard`` True and their own run id.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import fewshot_nsl
from fewshot_nsl.api import KeptRowWarning
from fewshot_nsl.cli import main
from fewshot_nsl.leaderboard import read_leaderboard

REPO = Path(__file__).resolve().parent.parent


def _common(tmp_path: Path) -> dict:
    return dict(dataset="tiny", profile="smoke", image_size=16, results_dir=str(tmp_path / "results"),
                cache_dir=str(tmp_path / "cache"), plugins=[REPO / "tests" / "plugins"], threads=1)


def _board(tmp_path: Path):
    return read_leaderboard(tmp_path / "results" / "leaderboard.csv")


def test_benchmark_marks_a_row_the_leaderboard_kept_out_and_warns_without_log(tmp_path):
    common = _common(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeptRowWarning)  # a row that goes onto the leaderboard: no warning
        first = fewshot_nsl.benchmark("protonet", eval={"episodes": 8, "queries": 3}, **common)
    assert bool(first.loc[0, "on_leaderboard"]) is True
    assert first.loc[0, "leaderboard_run_id"] == first.loc[0, "run_id"]
    kept_run = str(_board(tmp_path).loc[0, "run_id"])
    assert kept_run == first.loc[0, "run_id"]

    with pytest.warns(KeptRowWarning, match=r"kept the row .* 8 episodes x 1 seed.*replace_row=True") as record:
        rows = fewshot_nsl.benchmark("protonet", eval={"episodes": 4, "queries": 3}, **common)
    assert len([w for w in record if issubclass(w.category, KeptRowWarning)]) == 1
    assert int(rows.loc[0, "episodes"]) == 4  # what this call measured ...
    assert bool(rows.loc[0, "on_leaderboard"]) is False  # ... which is not what the leaderboard holds
    assert rows.loc[0, "leaderboard_run_id"] == kept_run
    assert rows.loc[0, "run_id"] != kept_run
    assert int(_board(tmp_path).loc[0, "episodes"]) == 8

    lines = []  # with a log, the kept line goes there (once) and no warning is raised
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeptRowWarning)
        again = fewshot_nsl.benchmark("protonet", eval={"episodes": 4, "queries": 3}, log=lines.append, **common)
    assert bool(again.loc[0, "on_leaderboard"]) is False and again.loc[0, "leaderboard_run_id"] == kept_run
    assert len([line for line in lines if "kept the row" in line]) == 1


def test_json_rows_say_which_row_the_leaderboard_kept(tmp_path, capsys):
    args = ["--results-dir", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
            "--plugins", str(REPO / "tests" / "plugins"), "--dataset", "tiny", "--image-size", "16",
            "--profile", "smoke", "--queries", "3", "--no-progress", "--method", "protonet", "--json"]
    threads = torch.get_num_threads()
    try:
        assert main([*args, "--n-episodes", "8"]) == 0
        first = json.loads(capsys.readouterr().out)
        assert main([*args, "--n-episodes", "4"]) == 0
        second = json.loads(capsys.readouterr().out)
    finally:
        torch.set_num_threads(threads)
    assert first[0]["on_leaderboard"] is True and first[0]["leaderboard_run_id"] == first[0]["run_id"]
    assert second[0]["episodes"] == 4
    assert second[0]["on_leaderboard"] is False and second[0]["leaderboard_run_id"] == first[0]["run_id"]


def _row(episodes: int, run: str, method: str = "protonet") -> dict:
    return {"dataset": "tiny", "dataset_fingerprint": "f" * 16, "split": "test", "episode_hash": "e" * 16,
            "image_size": 16, "method": method, "backbone": "cnn4", "ways": 5, "shots": 1, "profile": "smoke",
            "precision": "fp32", "accuracy": 50.0, "ci95": 1.0, "episodes": episodes, "seeds": "0", "n_seeds": 1,
            "run_id": run}


def test_grid_rows_marks_each_cell_against_the_leaderboard(tmp_path):
    """Unit level (no training): on the board; kept out by a row with more evidence; replaced meanwhile by
    another run; no row for the cell at all."""
    from types import SimpleNamespace

    from fewshot_nsl.api import grid_rows
    from fewshot_nsl.leaderboard import upsert_row

    board = tmp_path / "leaderboard.csv"
    upsert_row(board, _row(8, "proto_a"))
    upsert_row(board, _row(4, "proto_b"))  # less evidence: kept out
    upsert_row(board, _row(8, "nn_a", "nearest_neighbor"))
    upsert_row(board, _row(8, "nn_b", "nearest_neighbor"))  # as much evidence: replaces nn_a
    cells = [SimpleNamespace(row=r) for r in (_row(8, "proto_a"), _row(4, "proto_b"),
                                              _row(8, "nn_a", "nearest_neighbor"), _row(8, "mn_a", "matchingnet"))]
    cells.append(SimpleNamespace(row=None))  # a failed cell: no row
    rows = grid_rows(SimpleNamespace(cells=cells), tmp_path)
    assert list(rows["run_id"]) == ["proto_a", "proto_b", "nn_a", "mn_a"]
    assert list(rows["on_leaderboard"]) == [True, False, False, False]
    assert list(rows["leaderboard_run_id"][:3]) == ["proto_a", "proto_a", "nn_b"]
    assert rows["leaderboard_run_id"].isna()[3]  # None (null in --json)
    assert list(rows["episodes"].astype(int)) == [8, 4, 8, 8]
