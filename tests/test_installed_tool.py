"""Issue 12 items 3-5: --set overrides, output flags (--json, --quiet, --log-file, progress),
training curves, the command name in messages, and the Python API (the README's example runs)."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from fewshot_nsl import cli
from fewshot_nsl.config import resolve_config
from fewshot_nsl.console import command_name, show_progress
from fewshot_nsl.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
TINY = ["--plugins", str(REPO / "tests" / "plugins"), "--dataset", "tiny", "--image-size", "16"]
#: One tiny protonet cell, configured through --set only.
CELL = [*TINY, "--method", "protonet", "--shots", "1", "--n-episodes", "4", "--queries", "3", "--profile", "smoke",
        "--set", "episodic.steps=3", "--set", "episodic.queries=3", "--set", "episodic.checkpoint_every=1"]


def _resolved(argv, config_file=None):
    args = cli.build_parser().parse_args(argv)
    return resolve_config(cli.overrides_of(args, "protonet"), config_file or args.config)


def test_set_is_typed_dotted_and_sits_between_config_and_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("episodic: {steps: 50, lr: 0.01}\nimage_size: 40\n")
    cfg = _resolved(["--config", str(cfg_file), "--set", "episodic.steps=10", "--set", "method_options.temperature=0.5",
                     "--set", "deterministic=true", "--set", "eval.split=val"])
    assert cfg.episodic.steps == 10 and isinstance(cfg.episodic.steps, int)  # --set over --config
    assert cfg.episodic.lr == 0.01 and cfg.image_size == 40  # the rest of the file stays
    assert cfg.method_options["temperature"] == 0.5 and cfg.deterministic is True and cfg.eval.split == "val"
    cfg = _resolved(["--set", "image_size=40", "--image-size", "24", "--set", "eval.episodes=9", "--n-episodes", "3"])
    assert cfg.image_size == 24 and cfg.eval.episodes == 3  # a dedicated flag wins over --set
    assert _resolved(["--set", "episodic.steps=1", "--set", "episodic.steps=2"]).episodic.steps == 2  # last wins


@pytest.mark.parametrize("item,fragment", [
    ("episodic.stepz=3", "unknown config key(s) stepz in --set.episodic; accepted: "),
    ("stepz=3", "unknown config key(s) stepz in --set; accepted: "),
    ("episodic.steps=ten", "--set.episodic.steps must be int, got 'ten'"),
    ("episodic", "--set expects KEY=VALUE"),
    ("shots=1", "use --shots"),
])
def test_set_refuses_like_a_config_file(item, fragment):
    with pytest.raises(ConfigError) as err:
        _resolved(["--set", item])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_set_unknown_key_message_matches_the_file_message(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("episodic: {stepz: 3}\n")
    with pytest.raises(ConfigError) as from_file:
        _resolved(["--config", str(cfg_file)])
    with pytest.raises(ConfigError) as from_set:
        _resolved(["--set", "episodic.stepz=3"])
    assert str(from_set.value) == str(from_file.value).replace(f"{cfg_file}.episodic", "--set.episodic")


def test_json_quiet_log_file_and_training_curve(tmp_path, capsys):
    results, log = tmp_path / "results", tmp_path / "logs" / "run.log"
    code = cli.main(["--results-dir", str(results), *CELL, "--json", "--quiet", "--log-file", str(log)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.err == ""  # --quiet: no info lines, no bars
    (row,) = json.loads(out.out)  # --json: stdout holds the JSON document only
    assert row["method"] == "protonet" and row["episodes"] == 4 and row["version"]
    logged = log.read_text()
    assert "leaderboard:" in logged and row["run_id"] in logged  # the log file gets the info lines anyway
    run = results / "runs" / row["run_id"]
    assert (run / "config.yaml").read_text().count("steps: 3") == 1  # --set reached the saved config
    lines = (run / "training_curve.csv").read_text().splitlines()
    assert lines[0] == "stage,step,loss,accuracy" and [line.split(",")[:2] for line in lines[1:]] == [
        ["episodic", "1"], ["episodic", "2"], ["episodic", "3"]]
    assert all(0.0 <= float(line.split(",")[3]) <= 1.0 for line in lines[1:])  # protonet's logits give accuracy
    assert (run / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # without --json the info lines are back on stdout
    assert cli.main(["--results-dir", str(results), *CELL]) == 0
    out = capsys.readouterr()
    assert "nothing to do" in out.out and out.err == ""


def test_json_list(capsys):
    assert cli.main(["--list", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"protonet", "dynamic_nsn"} <= {m["name"] for m in doc["methods"]} and "cnn4" in doc["backbones"]


def test_progress_bars_only_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert show_progress(None, stream=io.StringIO()) is False
    assert show_progress(None, stream=Tty()) is True
    assert show_progress(True, stream=io.StringIO()) is True and show_progress(False, stream=Tty()) is False
    assert show_progress(True, quiet=True) is False
    assert cli.build_parser().parse_args([]).progress is None
    assert cli.build_parser().parse_args(["--no-progress"]).progress is False


@pytest.mark.parametrize("argv0,name", [
    ("/venv/bin/fewshot-nsl", "fewshot-nsl"), ("/x/fewshot_nsl/__main__.py", "python -m fewshot_nsl"),
    ("run_benchmarks.py", "run_benchmarks.py"), ("/repo/run_benchmarks.py", "run_benchmarks.py"),
])
def test_messages_name_the_command_that_was_run(argv0, name, monkeypatch, capsys):
    assert command_name(argv0) == name
    monkeypatch.setattr("sys.argv", [argv0])
    with pytest.raises(SystemExit):
        cli.main(["--bogus"])
    assert capsys.readouterr().err.strip().endswith(f"see {name} --help")


def test_api_rejects_unknown_overrides():
    import fewshot_nsl

    with pytest.raises(ConfigError, match=r"unknown config key\(s\) stepz in benchmark\(\)\.episodic"):
        fewshot_nsl.benchmark(method="protonet", episodic={"stepz": 3})
    with pytest.raises(ConfigError, match="no leaderboard"):
        fewshot_nsl.load_results("/nonexistent/results")


def readme_block(heading: str) -> str:
    """The first ```python block after ``heading`` in the README."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes ./results
    namespace: dict = {}
    exec(compile(readme_block("## Use from Python"), "README.md", "exec"), namespace)
    rows, board = namespace["rows"], namespace["board"]
    assert list(rows["method"]) == ["protonet", "nearest_neighbor"] and list(rows["episodes"]) == [10, 10]
    assert sorted(board["run_id"]) == sorted(rows["run_id"]) and (tmp_path / "results" / "leaderboard.csv").is_file()
    assert int(namespace["stats"]["n_paired"].iloc[0]) == 10
    assert len(namespace["pred"]) == 15 and set(namespace["pred"]) <= {"alpha", "beta", "gamma"}


def test_grid_names_resolve_to_the_packaged_configs(tmp_path, monkeypatch):
    from fewshot_nsl.config import CONFIG_DIR

    monkeypatch.chdir(tmp_path)  # an empty folder: no configs/ here
    for spec in ("table6", "table6.yaml", "configs/table6.yaml"):
        assert cli.grid_path(spec) == CONFIG_DIR / "table6.yaml"
    (tmp_path / "table6.yaml").write_text("rows: []\n")
    assert cli.grid_path("table6.yaml") == Path("table6.yaml")  # a file that exists wins
    assert cli.grid_path("elsewhere/table6.yaml") == Path("elsewhere/table6.yaml")  # load_grid names it missing
