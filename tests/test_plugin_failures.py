"""A plugin that fails outside the test episodes is one error line too, and a run whose every test episode
failed leaves no leaderboard row (a 0.00 row would read as a result); a run with some failed episodes says so."""
from __future__ import annotations

from pathlib import Path

import torch

from fewshot_nsl.cli import main
from fewshot_nsl.leaderboard import read_leaderboard

REPO = Path(__file__).resolve().parent.parent
TINY = ["--plugins", str(REPO / "tests" / "plugins"), "--plugins", str(REPO / "tests" / "training_fault_plugins"),
        "--dataset", "tiny", "--image-size", "16", "--profile", "smoke", "--queries", "3", "--n-episodes", "4",
        "--shots", "1", "--no-progress"]


def cli(tmp_path, capsys, *args):
    before = torch.get_num_threads()
    try:
        code = main(["--results-dir", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache"), "--threads",
                     "1", *TINY, *args])
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr()
    return code, out.out, out.err


def error_lines(err: str):
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def test_a_method_raising_in_episodic_training_is_one_line_naming_the_call(tmp_path, capsys):
    code, out, err = cli(tmp_path, capsys, "--method", "raises_in_training_loss")
    assert code == 2, out + err
    assert "Traceback" not in err and len(error_lines(err)) == 1, err
    line = error_lines(err)[0]
    assert "raises_in_training_loss raised KeyError in loss on training step 1" in line and "error.txt" in line, line
    assert not (tmp_path / "results" / "leaderboard.csv").is_file()
    (txt,) = list((tmp_path / "results" / "runs").glob("*/error.txt"))
    assert "KeyError" in txt.read_text()


def test_a_constructor_that_rejects_an_option_value_is_one_line(tmp_path, capsys):
    code, out, err = cli(tmp_path, capsys, "--method", "raises_in_constructor", "--set", "method_options.scale=five")
    assert code == 2, out + err
    assert "Traceback" not in err and len(error_lines(err)) == 1, err
    assert "could not be built with method_options {'scale': 'five'}: TypeError" in err, err


def test_every_episode_failed_gives_no_row_and_some_failed_gives_a_warning(tmp_path, capsys):
    code, out, err = cli(tmp_path, capsys, "--method", "nan_on_every_episode")
    assert code == 1, out + err
    assert "every one of its 4 test episodes failed" in out + err and "no leaderboard row" in out + err
    lb = tmp_path / "results" / "leaderboard.csv"
    assert not lb.is_file() or read_leaderboard(lb).empty
    code, out, err = cli(tmp_path, capsys, "--plugins", str(REPO / "tests" / "faulty_plugins"),
                         "--method", "nan_logits_on_odd_episodes")
    assert code == 0, out + err
    assert "warning: 2 of 4 test episodes of nan_logits_on_odd_episodes" in out + err
    assert int(read_leaderboard(lb).iloc[0]["episodes_failed"]) == 2


def test_training_stages_given_as_a_string_is_one_line_that_names_the_comma(tmp_path, capsys):
    code, out, err = cli(tmp_path, capsys, "--method", "stages_as_a_string")
    assert code == 2 and len(error_lines(err)) == 1, out + err
    assert "training_stages must be a tuple" in err and "('episodic',)" in err, err


def test_an_unknown_dataset_option_lists_only_what_a_user_may_set(tmp_path, capsys):
    code, out, err = cli(tmp_path, capsys, "--method", "protonet", "--set", "dataset_options.sizee=3")
    assert code == 2 and len(error_lines(err)) == 1, out + err
    line = error_lines(err)[0]
    assert "unknown option(s) sizee for dataset 'tiny'" in line
    assert not any(name in line for name in ("cache_dir", "data_root", "image_size")), line
