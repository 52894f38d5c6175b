"""A row never loses evidence (issue 25): a run on fewer episodes or fewer seeds never replaces a
leaderboard row measured on more unless ``replace`` is asked for; a row aggregates every finished
seed of its identity; ``eval.episodes`` above the episode list's length is one error line; failed
(non-finite) episodes count as wrong; run folders stay inside ``<results_dir>/runs/`` whatever the
names; and leaderboard cells that start like a spreadsheet formula are escaped (and read back)."""
from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from fewshot_nsl.cli import main
from fewshot_nsl.config import resolve_config
from fewshot_nsl.errors import ConfigError
from fewshot_nsl.identity import RunIdentity
from fewshot_nsl.leaderboard import read_leaderboard, upsert_row
from fewshot_nsl.registry import load_plugins

REPO = Path(__file__).resolve().parent.parent
TINY = ["--plugins", str(REPO / "tests" / "plugins"), "--dataset", "tiny", "--image-size", "16",
        "--profile", "smoke", "--queries", "3", "--no-progress"]
# The faulty methods are loaded by the one test that needs them, not at import: a module-level load would put
# them into test_method_smoke's parametrisation (list_methods() at its collection), which expects sound methods.


def cli(tmp_path, capsys, *args):
    threads = torch.get_num_threads()
    try:  # one thread: fast on a busy machine; restored for the tests that follow
        code = main(["--results-dir", str(tmp_path / "results"), "--threads", "1", *TINY, *args])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return code, out.out, out.err


def board(tmp_path) -> pd.DataFrame:
    return read_leaderboard(tmp_path / "results" / "leaderboard.csv")


def summaries(tmp_path):
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "results" / "runs").glob("*/summary.json"))]


# ----------------------------------------------------------------------------- end to end
def test_fewer_episodes_never_replace_a_row_measured_on_more(tmp_path, capsys):
    code, _, err = cli(tmp_path, capsys, "--n-episodes", "12")
    assert code == 0, err
    code, out, err = cli(tmp_path, capsys, "--n-episodes", "6")
    assert code == 0, err
    df = board(tmp_path)
    assert len(df) == 1 and int(df.loc[0, "episodes"]) == 12  # the stronger row stays
    # the 6-episode run completed and its folder is kept
    assert sorted(s["episodes"] for s in summaries(tmp_path)) == [6, 12]


def test_a_plain_rerun_keeps_every_finished_seed_of_the_cell(tmp_path, capsys):
    code, _, err = cli(tmp_path, capsys, "--n-episodes", "6", "--seeds", "0,1")
    assert code == 0, err
    assert int(board(tmp_path).loc[0, "n_seeds"]) == 2
    code, out, err = cli(tmp_path, capsys, "--n-episodes", "6")  # seed 0 only: complete already
    assert code == 0, err
    df = board(tmp_path)
    assert len(df) == 1 and int(df.loc[0, "n_seeds"]) == 2 and df.loc[0, "seeds"] == "0,1", df.loc[0].to_dict()


def test_a_later_seed_joins_the_seeds_already_finished(tmp_path, capsys):
    """``--seed 1`` after ``--seed 0`` (same identity otherwise) gives a two-seed row; a seed of other
    settings (here more training steps) is another experiment and is not mixed in."""
    assert cli(tmp_path, capsys, "--n-episodes", "6")[0] == 0
    assert cli(tmp_path, capsys, "--n-episodes", "6", "--seed", "1")[0] == 0
    row = board(tmp_path).loc[0]
    assert int(row["n_seeds"]) == 2 and row["seeds"] == "0,1" and len(row["run_id"].split(";")) == 2
    code, _, err = cli(tmp_path, capsys, "--n-episodes", "6", "--seed", "2", "--set", "episodic.steps=3")
    assert code == 0, err
    row = board(tmp_path).loc[0]
    assert row["seeds"] == "0,1"  # the one-seed row of other settings does not replace the two-seed row


@pytest.mark.parametrize("flag", [["--set", "eval.episodes=10000"], ["--n-episodes", "10000"]])
def test_more_episodes_than_the_list_holds_is_one_error_line(tmp_path, capsys, flag):
    code, out, err = cli(tmp_path, capsys, *flag)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in ("10000", "600 episodes", "--n-episodes", "--episodes"):
        assert fragment in lines[0], lines[0]
    assert not (tmp_path / "results" / "runs").exists()  # refused before any run folder


def test_failed_episodes_count_as_wrong_and_the_run_is_complete(tmp_path):
    from fewshot_nsl.evaluation import read_episode_results
    from fewshot_nsl.runner import is_complete, run, run_dir_of, run_identity

    load_plugins([REPO / "tests" / "faulty_plugins"])

    cfg = resolve_config({"method": "nan_logits_on_odd_episodes", "profile": "smoke", "dataset": "tiny", "ways": 5,
                          "shots": 2, "image_size": 16, "results_dir": str(tmp_path / "results"),
                          "cache_dir": str(tmp_path / "cache"), "device": "cpu", "eval": {"episodes": 8, "queries": 3}})
    row = run(cfg, progress=False, log=lambda *a: None)
    rows = read_episode_results(run_dir_of(cfg) / "episodes.csv")
    ok = [float(r["accuracy"]) for r in rows.values() if r["status"] == "ok"]
    assert len(ok) == 4
    summary = json.loads((run_dir_of(cfg) / "summary.json").read_text())
    assert summary["episodes"] == 8 and summary["episodes_failed"] == 4
    assert summary["accuracy"] == pytest.approx(sum(ok) / 8, abs=1e-3)  # failed episodes are 0, not dropped
    assert row["episodes"] == 8 and row["episodes_failed"] == 4
    assert row["accuracy"] == pytest.approx(sum(ok) / 8, abs=1e-3)
    assert is_complete(cfg, run_identity(cfg), 8) is not None


def _grid_takes_replace_row() -> bool:
    from fewshot_nsl.grid import run_grid

    return "replace_row" in inspect.signature(run_grid).parameters


@pytest.mark.skipif(not _grid_takes_replace_row(), reason="needs grid.run_grid(replace_row=...) and --replace-row "
                                                          "in cli.py (issue 25, reported to their owner)")
def test_the_console_says_which_row_was_kept_and_replace_row_replaces_it(tmp_path, capsys):
    assert cli(tmp_path, capsys, "--n-episodes", "12")[0] == 0
    code, out, err = cli(tmp_path, capsys, "--n-episodes", "6")
    assert code == 0, err
    kept = [line for line in out.splitlines() if "kept" in line]
    assert len(kept) == 1 and "12 episodes x 1 seed" in kept[0] and "--replace-row" in kept[0], out
    assert str(tmp_path / "results" / "runs") in kept[0]
    code, out, err = cli(tmp_path, capsys, "--n-episodes", "6", "--replace-row")
    assert code == 0, err
    assert int(board(tmp_path).loc[0, "episodes"]) == 6


def _benchmark_takes_replace_row() -> bool:
    from fewshot_nsl.api import benchmark

    return _grid_takes_replace_row() and "replace_row" in inspect.signature(benchmark).parameters


@pytest.mark.skipif(not _benchmark_takes_replace_row(), reason="needs benchmark(replace_row=...) in api.py and "
                                                               "grid.run_grid(replace_row=...) (issue 25, reported)")
def test_benchmark_keeps_the_stronger_row_and_says_so_unless_replace_row(tmp_path):
    import fewshot_nsl

    common = dict(dataset="tiny", profile="smoke", image_size=16, results_dir=str(tmp_path / "results"),
                  cache_dir=str(tmp_path / "cache"), plugins=[REPO / "tests" / "plugins"], threads=1)
    fewshot_nsl.benchmark("protonet", eval={"episodes": 12, "queries": 3}, **common)
    lines = []
    rows = fewshot_nsl.benchmark("protonet", eval={"episodes": 6, "queries": 3}, log=lines.append, **common)
    assert int(rows.loc[0, "episodes"]) == 6  # what this call measured
    assert int(board(tmp_path).loc[0, "episodes"]) == 12  # what the leaderboard keeps
    assert len([line for line in lines if "kept" in line]) == 1
    fewshot_nsl.benchmark("protonet", eval={"episodes": 6, "queries": 3}, replace_row=True, **common)
    assert int(board(tmp_path).loc[0, "episodes"]) == 6


# ----------------------------------------------------------------------------- the rule
def _row(episodes: int, seeds: str, accuracy: float = 50.0, method: str = "protonet") -> dict:
    return {"dataset": "tiny", "dataset_fingerprint": "f" * 16, "split": "test", "episode_hash": "e" * 16,
            "image_size": 16, "method": method, "backbone": "cnn4", "ways": 5, "shots": 1, "profile": "smoke",
            "accuracy": accuracy, "ci95": 1.0, "episodes": episodes, "seeds": seeds, "n_seeds": len(seeds.split(",")),
            "run_id": f"{method}_{episodes}_{seeds.replace(',', '-')}_{accuracy}"}


@pytest.mark.parametrize("old,new,replaced", [
    ((20, "0"), (8, "0"), False),        # fewer episodes
    ((20, "0,1"), (20, "0"), False),     # fewer seeds
    ((20, "0"), (8, "0,1,2"), False),    # more seeds but fewer episodes: never loses the episodes
    ((8, "0,1,2"), (20, "0"), False),    # more episodes but fewer seeds: never loses the seeds
    ((20, "0"), (20, "0"), True),        # the same evidence: the newer row (a re-run) replaces
    ((20, "0"), (40, "0"), True),
    ((20, "0"), (20, "0,1"), True),
])
def test_a_row_with_less_evidence_never_replaces_one_with_more(tmp_path, old, new, replaced):
    path = tmp_path / "leaderboard.csv"
    upsert_row(path, _row(*old, accuracy=10.0))
    lines = []
    upsert_row(path, _row(*new, accuracy=90.0), log=lines.append)
    df = read_leaderboard(path)
    assert len(df) == 1
    assert float(df.loc[0, "accuracy"]) == (90.0 if replaced else 10.0)
    assert len(lines) == (0 if replaced else 1)
    upsert_row(path, _row(*new, accuracy=70.0), replace=True)  # the explicit flag always replaces
    assert float(read_leaderboard(path).loc[0, "accuracy"]) == 70.0


def test_the_kept_row_is_said_in_one_line(tmp_path):
    path = tmp_path / "results" / "leaderboard.csv"
    path.parent.mkdir()
    upsert_row(path, _row(20, "0,1", accuracy=10.0))
    lines = []
    upsert_row(path, _row(8, "0", accuracy=90.0), log=lines.append)
    assert len(lines) == 1 and "\n" not in lines[0]
    line = lines[0]
    for fragment in ("kept", "20 episodes x 2 seeds", "8 episodes x 1 seed", "--replace-row",
                     str(path.parent / "runs" / "protonet_8_0_90.0")):
        assert fragment in line, line


# ----------------------------------------------------------------------------- names are data
def _cfg_and_identity(tmp_path, **names):
    cfg = resolve_config({"method": "protonet", "profile": "smoke", "dataset": "tiny", "image_size": 16,
                          "results_dir": str(tmp_path / "results")})
    identity = RunIdentity(config_hash="c" * 16, dataset_fingerprint="f" * 16, episode_hash="e" * 16, split="test",
                           code_hash="h" * 16)
    return dataclasses.replace(cfg, **names), identity


@pytest.mark.parametrize("names", [
    {"method": "../../escaped"}, {"method": "a/../../../../outside/x"}, {"backbone": "..\\..\\x"},
    {"dataset": "/abs/path"}, {"profile": "p\nq"}, {"method": "m\0"}, {"method": "m" * 300},
])
def test_a_run_folder_is_never_outside_the_results_folder(tmp_path, names):
    from fewshot_nsl.runner import run_dir_of

    cfg, identity = _cfg_and_identity(tmp_path, **names)
    with pytest.raises(ConfigError) as info:
        run_dir_of(cfg, identity)
    assert "\n" not in str(info.value) and "run folder" in str(info.value)


def test_a_run_folder_symlinked_out_of_the_results_folder_is_refused(tmp_path):
    from fewshot_nsl.runner import run_dir_of, run_id

    cfg, identity = _cfg_and_identity(tmp_path)
    assert run_dir_of(cfg, identity) == tmp_path / "results" / "runs" / run_id(cfg, identity)
    runs = tmp_path / "results" / "runs"
    runs.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (runs / run_id(cfg, identity)).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="outside"):
        run_dir_of(cfg, identity)


@pytest.mark.parametrize("name", ["=HYPERLINK(\"http://x\",\"y\")", "+1+cmd", "-2+3", "@SUM(A1)", "\tx", "\rx",
                                  "'=already quoted", "''+two"])
def test_formula_prefixes_are_escaped_in_the_csv_and_read_back(tmp_path, name):
    path = tmp_path / "leaderboard.csv"
    row = _row(10, "0", method=name) | {"device_name": "@evil", "episode_list": "=list.json",
                                        "accuracy": -0.5}
    upsert_row(path, row)
    import csv

    with path.open(newline="") as f:
        written = list(csv.DictReader(f))[0]
    for col in ("method", "device_name", "episode_list"):
        assert written[col][0] not in "=+-@\t\r", (col, written[col])
    assert written["accuracy"] == "-0.5"  # numbers are not text: never escaped
    df = read_leaderboard(path)
    assert df.loc[0, "method"] == name and df.loc[0, "device_name"] == "@evil"
    assert df.loc[0, "episode_list"] == "=list.json" and float(df.loc[0, "accuracy"]) == -0.5
    upsert_row(path, _row(10, "0", method=name) | {"accuracy": 1.0})  # a rewrite keeps one row, still escaped
    df = read_leaderboard(path)
    assert len(df) == 1 and df.loc[0, "method"] == name
