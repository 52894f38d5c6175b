"""Issue 28, items 7, 8, 9 and 11: progress lines for piped output and resume notes, times that add up across
resumed parts, --dry-run config differences and cost estimates, TensorBoard evaluation + hparams, the MLflow
tracker, and the fit_base hook (SimpleShot as an example plugin). Tiny dataset, 16 px, a few steps."""
import json
import re
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from fewshot_nsl import runner as runner_mod
from fewshot_nsl.config import resolve_config
from fewshot_nsl.console import Heartbeat, ProgressMode, RunStatus, progress_every_of
from fewshot_nsl.errors import ConfigError
from fewshot_nsl.grid import Cell, config_diff, cost_estimate, run_grid
from fewshot_nsl.runner import execute, read_parts, run_dir_of

REPO = Path(__file__).resolve().parent.parent
STAMP = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] ")


def tiny_cli(tmp_path, method="protonet", **extra):
    cli = {"method": method, "profile": "smoke", "dataset": "tiny", "ways": 5, "shots": 2, "image_size": 16,
           "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"), "device": "cpu",
           "eval": {"episodes": 8, "queries": 5}}
    cli.update(extra)
    return cli


# ----------------------------------------------------------------------------- 7: progress lines
def test_progress_line_says_stage_step_loss_validation_and_eta():
    status = RunStatus("protonet cnn4 5w5s seed 0", log=lambda line: None)
    assert "setting up" in status.line()
    status.begin("episodic", 100, done=20)
    assert "ETA unknown" in status.line()
    time.sleep(0.02)
    status.step, status.loss, status.val_accuracy = 60, 1.23456, 0.4567
    line = status.line()
    assert STAMP.match(line), line
    assert "protonet cnn4 5w5s seed 0: episodic step 60/100 (60%)" in line
    assert "loss 1.2346" in line and "val acc 45.67%" in line and re.search(r"ETA \d+:\d\d:\d\d", line)
    status.begin("evaluate", 10, done=4, unit="episode", poll=lambda: (7, 55.5))
    line = status.line()
    assert "evaluate episode 7/10 (70%)" in line and "mean acc so far 55.50%" in line


def test_heartbeat_prints_lines_only_while_running_and_only_when_asked():
    lines = []
    status = RunStatus("x", log=lines.append)
    with Heartbeat(status, 0.02, lines.append):
        time.sleep(0.15)
    n = len(lines)
    assert n >= 2 and all(STAMP.match(line) for line in lines)
    time.sleep(0.06)
    assert len(lines) == n  # stopped with the block
    with Heartbeat(status, None, lines.append):
        time.sleep(0.05)
    assert len(lines) == n
    assert not ProgressMode(False, 5) and ProgressMode(True, None)
    assert progress_every_of(ProgressMode(False, 5)) == 5.0 and progress_every_of(False) is None


def test_piped_run_prints_progress_lines_of_training_and_evaluation(tmp_path, monkeypatch):
    lines = []
    # slow each evaluation a little so a line falls inside the stage
    real = runner_mod.evaluate_run

    def slow_eval(ctx, *a, **k):
        time.sleep(0.3)
        return real(ctx, *a, **k)

    monkeypatch.setattr(runner_mod, "evaluate_run", slow_eval)
    run_grid([Cell("protonet")], tiny_cli(tmp_path, episodic={"steps": 30}), progress=False, log=lines.append,
             progress_every=0.05, fail_fast=True)
    progress = [line for line in lines if STAMP.match(line)]
    assert any("episodic step" in line and "/30" in line for line in progress), lines
    assert any("evaluate episode" in line and "/8" in line for line in progress), lines
    assert not [line for line in lines if "resuming" in line]  # a fresh run says nothing about resuming


def test_progress_every_refuses_a_negative_interval(tmp_path):
    with pytest.raises(ConfigError, match="progress-every"):
        run_grid([Cell("protonet")], tiny_cli(tmp_path), progress=False, log=lambda s: None, progress_every=-1)


def test_resume_says_where_and_times_add_up_across_parts(tmp_path, monkeypatch):
    """Part 1 is interrupted during episodic training after 0.4 s; part 2 trains again and is interrupted in the
    evaluation; part 3 finishes. train_time_s counts parts 1 and 2, wall = train + eval, the row says resumed."""
    cfg = resolve_config(tiny_cli(tmp_path, episodic={"steps": 6, "checkpoint_every": 2}))
    real_meta, real_eval = runner_mod.meta_train, runner_mod.evaluate_run

    def meta_then_stop(*a, **k):
        time.sleep(0.4)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_mod, "meta_train", meta_then_stop)
    with pytest.raises(KeyboardInterrupt):
        execute(cfg, progress=False, log=lambda s: None)
    rdir = run_dir_of(cfg)
    parts = read_parts(rdir)
    assert len(parts) == 1 and parts[0]["trained"] is False and parts[0]["train_s"] >= 0.4

    def eval_some_then_stop(ctx, *a, **k):
        real_eval(ctx, indices=range(3), out_csv=ctx.episodes_csv, progress=False)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_mod, "meta_train", real_meta)
    monkeypatch.setattr(runner_mod, "evaluate_run", eval_some_then_stop)
    lines = []
    with pytest.raises(KeyboardInterrupt):
        execute(cfg, progress=False, log=lines.append)
    assert any("resuming run" in line and "(part 2)" in line and "0 of 8 test episodes already done" in line
               for line in lines), lines
    train_record = json.loads((rdir / "train.json").read_text())
    assert train_record["train_time_s"] >= parts[0]["train_s"]  # part 1's seconds are in
    assert train_record["resumed"] is True

    monkeypatch.setattr(runner_mod, "evaluate_run", real_eval)
    lines = []
    summary = execute(cfg, progress=False, log=lines.append)
    assert any("(part 3)" in line and "training finished" in line and "3 of 8 test episodes already done" in line
               for line in lines), lines
    assert summary["resumed"] is True and summary["parts"] == 3
    assert summary["train_time_s"] == train_record["train_time_s"]
    assert summary["wall_time_s"] == pytest.approx(summary["train_time_s"] + summary["eval_time_s"], abs=0.02)
    assert [p["outcome"] for p in read_parts(rdir)] == ["interrupted", "interrupted", "finished"]


# ----------------------------------------------------------------------------- 8: --dry-run
def test_dry_run_shows_the_config_difference_and_says_when_there_is_no_estimate(tmp_path):
    lines = []
    run_grid([Cell("protonet")], tiny_cli(tmp_path, episodic={"steps": 7}), progress=False, log=lines.append,
             dry_run=True)
    text = "\n".join(lines)
    assert "config: differs from profile smoke (its value in brackets): " in text
    assert re.search(r"episodic\.steps 7 \(\d+\)", text) and re.search(r"eval\.episodes 8 \(\d+\)", text), text
    assert "image_size 16 (32)" in text and "dataset 'tiny' ('glyphs')" in text
    assert "cache_dir" not in text  # locations are not differences of the experiment
    assert "cost: no estimate (no measured cost table for profile smoke)" in text


def test_config_diff_against_a_config_file(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("profile: smoke\nepisodic: {steps: 5}\n")
    cfg = resolve_config({"method": "protonet", "episodic": {"steps": 9}}, str(cfg_file))
    assert config_diff(cfg, Cell("protonet"), str(cfg_file)) == \
        "differs from config file c.yaml (its value in brackets): episodic.steps 9 (5)"
    assert config_diff(resolve_config({"method": "protonet"}, str(cfg_file)), Cell("protonet"), str(cfg_file)) == \
        "as config file c.yaml"


@pytest.mark.skipif(not (REPO / "benchmarks" / "paper_cells.json").is_file(), reason="a checkout's cost tables")
def test_cost_estimates_name_their_table():
    paper = resolve_config({"method": "protonet", "profile": "paper", "shots": 5})
    table = json.loads((REPO / "benchmarks" / "paper_cells.json").read_text())
    cell = next(c for c in table.values() if (c["method"], c["backbone"], c["shots"]) == ("protonet", "cnn4", 5))
    text = cost_estimate(paper, store=None)
    assert "from benchmarks/paper_cells.json" in text
    hours = float(re.search(r"about ([\d.]+) h", text).group(1))
    assert hours == pytest.approx(cell["projected_full_h"], rel=0.05)  # the table's own projection for the paper cell
    assert cost_estimate(resolve_config({"method": "protonet", "profile": "paper", "image_size": 42}), None) \
        .startswith("no estimate (benchmarks/paper_cells.json was measured at 84 px")
    store = types.SimpleNamespace(name="glyphs")
    quick = cost_estimate(resolve_config({"method": "maml", "profile": "quick", "shots": 1}), store, n_seeds=3)
    assert "from results/reference/glyphs_quick/leaderboard.csv" in quick and "x 3 seeds to run" in quick
    assert cost_estimate(resolve_config({"method": "maml", "profile": "quick", "ways": 7}), store).startswith(
        "no estimate (results/reference/glyphs_quick/leaderboard.csv has no row")


# ----------------------------------------------------------------------------- 9: TensorBoard and MLflow
class FakeWriter:
    calls = []

    def __init__(self, log_dir):
        FakeWriter.calls.append(("init", log_dir))

    def add_scalar(self, tag, value, step):
        FakeWriter.calls.append(("scalar", tag, value, step))

    def add_hparams(self, hparams, metrics, run_name=None):
        FakeWriter.calls.append(("hparams", hparams, metrics, run_name))

    def close(self):
        pass


def test_tensorboard_gets_the_evaluation_accuracy_and_hparams(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    FakeWriter.calls = []
    summary = run_grid([Cell("protonet")], tiny_cli(tmp_path), progress=False, log=lambda s: None,
                       fail_fast=True).cells[0].summaries[0]
    scalars = {c[1]: c[2] for c in FakeWriter.calls if c[0] == "scalar"}
    assert scalars["evaluate/accuracy"] == summary["accuracy"] and scalars["evaluate/ci95"] == summary["ci95"]
    assert "episodic/loss" in scalars  # the training curves as before
    (_, hparams, metrics, _), = [c for c in FakeWriter.calls if c[0] == "hparams"]
    assert hparams["method"] == "protonet" and hparams["eval.episodes"] == 8 and hparams["image_size"] == 16
    assert all(isinstance(v, (bool, int, float, str)) for v in hparams.values())
    assert metrics == {"hparam/accuracy": summary["accuracy"], "hparam/ci95": summary["ci95"]}


def test_tracking_mlflow_without_mlflow_is_one_error_line(tmp_path, monkeypatch, capsys):
    from fewshot_nsl.cli import main

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    status = main(["--method", "protonet", "--profile", "smoke", "--tracking", "mlflow",
                   "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err == ["error: --tracking mlflow needs MLflow: pip install 'fewshot-nsl[tracking]' "
                                   "(or pip install mlflow-skinny)"]
    assert not (tmp_path / "r" / "runs").exists()  # refused before anything ran


def test_mlflow_logs_params_curves_row_and_run_folder_offline(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lines = []
    res = run_grid([Cell("protonet")], tiny_cli(tmp_path), progress=False, log=lines.append, tracking="mlflow",
                   fail_fast=True)
    summary = res.cells[0].summaries[0]
    store = (tmp_path / "results" / "mlruns")
    assert store.is_dir() and any("mlflow: run" in line for line in lines), lines
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    exp = client.get_experiment_by_name("fewshot-nsl")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == summary["run_id"]
    assert run.data.params["method"] == "protonet" and run.data.params["eval.episodes"] == "8"
    assert run.data.metrics["accuracy"] == pytest.approx(summary["accuracy"])
    assert run.data.tags["dataset"] == "tiny"
    assert len(client.get_metric_history(run.info.run_id, "episodic/loss")) >= 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "run")}
    assert {"run/summary.json", "run/episodes.csv", "run/config.yaml", "run/training_curve.csv"} <= artifacts
    assert not any(a.endswith(".pt") for a in artifacts)  # the weights stay in the run folder


def test_mlflow_tracking_uri_is_honoured(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from fewshot_nsl.tracking import tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker.example:5000")
    assert tracking_uri(tmp_path) == "http://tracker.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(tmp_path) == (tmp_path.resolve() / "mlruns").as_uri()


def test_a_failing_tracker_is_a_warning_not_a_failed_run(tmp_path):
    from fewshot_nsl.tracking import MlflowTracker

    tracker = MlflowTracker.__new__(MlflowTracker)
    lines = []
    tracker.log, tracker.uri = lines.append, "file:///nowhere"
    tracker._log_run = lambda s, d: (_ for _ in ()).throw(OSError("disk full"))
    assert tracker.log_run({"run_id": "r1"}, tmp_path) is None
    assert lines == ["warning: MLflow logging of run r1 failed (OSError: disk full); the run itself is complete"]


# ----------------------------------------------------------------------------- 11: fit_base, SimpleShot plugin
def test_fit_base_gets_cached_base_features_and_simpleshot_runs_as_a_plugin(tmp_path, monkeypatch):
    from fewshot_nsl.registry import load_plugins

    load_plugins([REPO / "examples" / "simpleshot"])
    seen = []
    from fewshot_nsl.registry import get_method_class

    cls = get_method_class("simpleshot")
    real = cls.fit_base

    def spy(self, features, labels):
        seen.append((tuple(features.shape), labels.dtype, int(labels.min()), int(labels.max())))
        real(self, features, labels)

    monkeypatch.setattr(cls, "fit_base", spy)
    cli = tiny_cli(tmp_path, method="simpleshot", pretrain={"max_steps": 30})
    res = run_grid([Cell("simpleshot")], cli, progress=False, log=lambda s: None, fail_fast=True)
    summary = res.cells[0].summaries[0]
    assert summary["episodes"] == 8 and summary["accuracy"] > 20.0  # chance is 20%
    (shape, dtype, lo, hi), = seen
    cfg = resolve_config(cli)
    store = runner_mod.load_store(cfg)
    train_classes = store.classes_in_split("train")
    n = sum(len(store.class_members(c)) for c in train_classes)
    assert shape[0] == n and len(shape) == 2 and dtype == torch.int64 and (lo, hi) == (0, len(train_classes) - 1)
    (cached,) = (tmp_path / "cache" / "pretrain").glob("*.base_features.pt")
    pretraining = cached.with_name(cached.name.replace(".base_features.pt", ".pt"))
    assert pretraining.is_file()  # named by the pretraining key, which the run identity covers
    weights = torch.load(run_dir_of(cfg) / "method.pt", map_location="cpu")
    assert weights["base_mean"].abs().sum() > 0  # the hook's state travels in method.pt
    # another run on the same pretraining (1 shot) reuses the cached features: not computed again
    stamp = cached.stat().st_mtime_ns
    run_grid([Cell("simpleshot", shots=1)], cli, progress=False, log=lambda s: None, fail_fast=True)
    assert len(seen) == 2 and seen[1][0] == shape and cached.stat().st_mtime_ns == stamp
    # a method that does not override the hook costs nothing: no features for nearest_neighbor's pretraining
    assert "fit_base" not in vars(get_method_class("nearest_neighbor"))
    run_grid([Cell("nearest_neighbor")], dict(cli, method="nearest_neighbor"), progress=False, log=lambda s: None,
             fail_fast=True)
    # simpleshot leaves pretraining to the built-ins: one shared pretraining, and its features file untouched
    assert len(list((tmp_path / "cache" / "pretrain").glob("*.pt"))) == 2  # one pretraining, one features file
    assert len(list((tmp_path / "cache" / "pretrain").glob("*.base_features.pt"))) == 1
    assert cached.stat().st_mtime_ns == stamp


def test_api_benchmark_passes_tracking_through_and_refuses_a_bad_value(tmp_path, monkeypatch):
    import fewshot_nsl.grid as grid_mod
    from fewshot_nsl import api

    with pytest.raises(ConfigError, match=r"^benchmark\(tracking='wandb'\): tracking must be 'mlflow' or None$"):
        api.benchmark("protonet", shots=2, tracking="wandb")
    seen = {}

    def spy(*args, **kwargs):
        seen["tracking"] = kwargs.get("tracking")
        return run_grid(*args, **kwargs)

    monkeypatch.setattr(grid_mod, "run_grid", spy)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # so tracking="mlflow" stops at the grid's own check
    with pytest.raises(ConfigError, match="needs MLflow"):
        api.benchmark("protonet", shots=2, tracking="mlflow", profile="smoke", dataset="tiny", image_size=16,
                      results_dir=str(tmp_path / "r"), cache_dir=str(tmp_path / "c"))
    assert seen["tracking"] == "mlflow"
