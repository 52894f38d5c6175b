"""Catalogue of hostile and broken inputs, each fed to the real CLI (issue 7).

Every case runs ``run_benchmarks.py`` (in process through ``fewshot_nsl.cli.main``; a few
representative ones as a real subprocess) against a results folder that already holds a
leaderboard and a finished run, and checks:

* a non-zero exit status;
* exactly one line on stderr, ``error: ...`` (or ``interrupted: ...``), naming the problem, no traceback;
* the results folder is byte-identical afterwards (nothing lost, nothing half-written). Run-time
  failures (NaN loss, out of memory, Ctrl-C) start a run first, so a new run folder may appear,
  but every file that was there before is byte-identical.

The last test prints the figure quoted in docs/robustness.md:
"N hostile or broken inputs tried, N refused cleanly, 0 results lost". With
``HOSTILE_CATALOGUE_MD=FILE`` it also writes the catalogue table (input, error line, test).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pandas as pd
import pytest
import torch

import hostile_inputs as H
from hostile_inputs import Case
from fewshot_nsl import cli

REPO = Path(__file__).resolve().parent.parent

CASES: List[Case] = [
    # --- data files
    Case("html_page_saved_as_pkl", "HTML page (Google Drive warning) saved as the learn2learn .pkl files",
         H.html_as_pkl, ["mini-imagenet-cache-train.pkl", "HTML page", "re-download"], subprocess=True),
    Case("html_page_saved_as_hdf5", "HTML page saved as a torchmeta .hdf5 file", H.html_as_hdf5,
         ["val_data.hdf5", "HTML page"]),
    Case("html_page_saved_as_csv", "HTML page saved as a Ravi split CSV", H.html_as_csv, ["val.csv", "HTML page"]),
    Case("empty_pickle", "0-byte pickle", H.empty_pkl, ["mini-imagenet-cache-test.pkl", "empty"]),
    Case("truncated_pickle", "truncated MetaOptNet pickle (first half)", H.truncated_pickle,
         ["category_split_train_phase_train.pickle", "truncated", "re-download"]),
    Case("truncated_hdf5", "truncated torchmeta HDF5 (first half)", H.truncated_hdf5,
         ["test_data.hdf5", "truncated"]),
    Case("truncated_jpeg", "truncated JPEG in a Ravi images/ folder", H.truncated_jpeg,
         [".jpg", "truncated", "re-download or replace it"]),
    Case("malicious_pickle", "pickle whose payload calls os.system (would create a file)", H.malicious_pickle,
         ["mini-imagenet-cache-train.pkl", "refusing to unpickle", "system"], subprocess=True),
    Case("float_images", "images stored as float32 instead of uint8", H.float_images,
         ["mini-imagenet-cache-test.pkl", "uint8", "float32"]),
    Case("grayscale_images", "images of shape (N, H, W) instead of (N, H, W, 3)", H.grayscale_images,
         ["mini-imagenet-cache-train.pkl", "(N, H, W, 3)", "(4, 8, 8)"]),
    Case("hdf5_one_channel", "HDF5 class dataset of shape (N, H, W, 1)", H.hdf5_wrong_shape,
         ["val_data.hdf5", "(N, H, W, 3)", "(2, 8, 8, 1)"]),
    Case("label_out_of_range", "MetaOptNet label outside catname2label", H.labels_out_of_range,
         ["category_split_test.pickle", "label 99 is out of range"]),
    Case("index_out_of_range", "learn2learn class_dict index past the image array", H.index_out_of_range,
         ["mini-imagenet-cache-test.pkl", "1000", "out of range"]),
    Case("duplicated_filename", "the same image file twice in one CSV", H.duplicated_filename,
         ["val.csv", "already listed", "remove the duplicate row"]),
    Case("duplicated_filename_across_csvs", "the same image file in train.csv and test.csv",
         H.duplicated_filename_across_csvs, ["test.csv", "train.csv", "already listed"]),
    Case("class_in_two_split_csvs", "a class in train.csv and val.csv", H.class_in_two_splits,
         ["train.csv", "val.csv", "in both the train and the val split", "exactly one split"]),
    Case("class_in_two_split_pickles", "a class in the train and validation pickles", H.class_in_two_split_pickles,
         ["mini-imagenet-cache-train.pkl", "mini-imagenet-cache-validation.pkl", "exactly one split"]),
    Case("csv_names_missing_image", "a CSV row naming a missing image", H.csv_missing_image,
         ["test.csv", "n0000000000000042.png", "missing"]),
    Case("non_utf8_csv", "a Latin-1 (non-UTF-8) CSV", H.non_utf8_csv, ["train.csv", "not UTF-8", "save it as UTF-8"]),
    Case("csv_bad_header", "a CSV with the wrong header", H.csv_bad_header, ["train.csv", "header"]),
    Case("split_with_wrong_class_count", "val split with 15 of its 16 classes", H.wrong_class_count,
         ["val split", "15 of its 16", "allow_noncanonical_split"]),
    Case("class_in_wrong_split", "a train class shipped in the val split", H.class_in_wrong_split,
         ["val_data.hdf5", "canonical Ravi split", "allow_noncanonical_split"]),
    Case("unknown_wnid", "a class that is not a Mini-ImageNet wnid", H.unknown_wnid,
         ["n99999999", "not a Mini-ImageNet class"]),
    Case("too_few_images_per_class", "3 images per class where Mini-ImageNet has 600", H.too_few_images_per_class,
         ["has 3 images, expected 600"]),
    Case("empty_directory", "an empty --data-root directory", H.empty_directory, ["empty directory"]),
    Case("unknown_layout", "a --data-root holding no known layout", H.unknown_layout,
         ["no known Mini-ImageNet layout", "readme.txt"]),
    Case("two_layouts_in_one_root", "two dataset layouts in one folder", H.two_formats_in_one_root,
         ["several dataset layouts", "learn2learn-pickle", "torchmeta-hdf5"]),
    Case("dataset_one_level_down", "--data-root one level above the dataset", H.nested_root,
         ["sub-folder mini-imagenet/", "--data-root"]),
    Case("loose_image_in_class_folders", "an image directly in test/ of a class-folder layout",
         H.loose_image_in_folders, ["loose.png", "sub-folder per class"]),
    Case("missing_split_file", "a missing split file", H.missing_split_file,
         ["miniImageNet_category_split_val.pickle", "missing"]),
    Case("wrong_data_root", "a --data-root that does not exist", H.wrong_data_root,
         ["no/such/folder", "does not exist", "--data-root"]),
    Case("no_data_root", "--dataset miniimagenet without --data-root", H.no_data_root,
         ["no Mini-ImageNet data root", "--data-root"]),
    # --- configs, options, plugins
    Case("yaml_unknown_key", "YAML config with an unknown key", H.yaml_unknown_key,
         ["unknown config key(s) imagesize", "config.yaml", "image_size"], subprocess=True),
    Case("yaml_unknown_nested_key", "YAML config with an unknown nested key", H.yaml_unknown_nested_key,
         ["unknown config key(s) epoch", "pretrain", "epochs"]),
    Case("yaml_wrong_type", "YAML config with a wrong type (shots: five)", H.yaml_wrong_type,
         ["config.yaml.shots must be int", "'five'"]),
    Case("yaml_wrong_nested_type", "YAML config with a wrong nested type", H.yaml_wrong_nested_type,
         ["eval.episodes must be int"]),
    Case("yaml_invalid", "YAML config with a syntax error", H.yaml_invalid, ["not valid YAML"]),
    Case("yaml_missing", "--config pointing at no file", H.yaml_missing, ["nowhere.yaml", "does not exist"]),
    Case("unknown_dataset_option", "misspelt dataset option in a config", H.unknown_dataset_option,
         ["allow_noncanonical_splits", "accepted: allow_noncanonical_split"]),
    Case("plugin_raises_on_import", "--plugins folder whose module raises on import", H.broken_plugin,
         ["unknown method 'my_method'", "my_method.py failed to import", "RuntimeError: boom", "protonet"],
         subprocess=True),
    Case("missing_plugin_folder", "--plugins folder that does not exist", H.missing_plugin_folder,
         ["no_plugins_here", "does not exist"]),
    Case("unknown_method", "unknown method name", H.unknown_method, ["unknown method 'protonett'", "protonet"]),
    Case("unknown_method_option", "unknown method option in a config", H.unknown_method_option,
         ["temprature", "accepted:", "temperature"]),
    Case("unknown_backbone", "unknown backbone", H.unknown_backbone, ["unknown backbone 'resnet99'", "cnn4"]),
    Case("unknown_dataset", "unknown dataset", H.unknown_dataset, ["unknown dataset 'imagenet21k'", "glyphs"]),
    Case("unknown_device", "unknown device", H.unknown_device, ["unknown device 'tpu'"]),
    Case("unknown_flag", "unknown command-line flag", H.unknown_flag,
         ["unrecognized arguments: --epochs 3", "--help"], subprocess=True),
    Case("bad_choice", "--profile with a value not offered", H.bad_choice, ["invalid choice: 'huge'"]),
    Case("non_integer_shots", "--shots five", H.bad_int, ["--shots", "expected comma-separated integers"]),
    Case("too_many_ways", "more ways than test classes", H.too_many_ways, ["--ways 9", "lower --ways"]),
    Case("too_few_ways", "--ways 1", H.too_few_ways, ["ways must be at least 2"]),
    Case("too_many_shots", "more shots+queries than images per class", H.too_many_shots,
         ["fewer than shots+queries"]),
    Case("zero_shots", "--shots 0", H.zero_shots, ["shots must be at least 1"]),
    Case("missing_episode_list", "--episodes pointing at no file", H.missing_episode_list, ["eps.json", "does not exist"]),
    Case("malformed_episode_list", "--episodes pointing at broken JSON", H.broken_episode_list,
         ["eps.json", "malformed"]),
    Case("seed_and_seeds", "--seed and --seeds together", H.seed_and_seeds, ["either --seed or --seeds"]),
    Case("zero_threads", "--threads 0", H.zero_threads, ["--threads must be at least 1"]),
    Case("ray_address_without_ray", "--ray-address with the local executor", H.ray_address_without_ray,
         ["--ray-address needs --executor ray"]),
    # --- issue 11/12: plugins registering a taken name, --set, output flags
    Case("plugin_file_named_like_a_builtin", "--plugins file protonet.py registering the built-in name protonet",
         H.plugin_named_like_a_builtin, ["method 'protonet' is registered twice", "lab_plugins/protonet.py",
                                         "baselines/protonet.py", "rename one of them"], subprocess=True),
    Case("plugin_registers_a_builtin_name", "--plugins file of another name registering the built-in name maml",
         H.plugin_registers_a_builtin_name, ["method 'maml' is registered twice", "my_meta_learner.py",
                                             "baselines/maml.py"]),
    Case("set_unknown_key", "--set with an unknown dotted key", H.set_unknown_key,
         ["unknown config key(s) stepz in --set.episodic", "accepted:", "steps"]),
    Case("set_wrong_type", "--set with a value of the wrong type", H.set_wrong_type,
         ["--set.episodic.steps must be int", "'ten'"]),
    Case("set_not_key_value", "--set without =VALUE", H.set_not_key_value, ["--set expects KEY=VALUE", "episodic.steps"]),
    Case("set_cell_key", "--set on a key that chooses the runs (method)", H.set_cell_key, ["--set method=maml", "use --method"]),
    Case("log_file_unwritable", "--log-file under a path that is a file", H.log_file_unwritable,
         ["cannot write the log file", "run.log", "--log-file"]),
    Case("json_with_report", "--json with --report (nothing to print as rows)", H.json_with_report,
         ["--json prints the rows", "--report"]),
    # --- issue 11: episode lists (checksums match: only validation catches them)
    Case("episodes_support_query_overlap", "episode list whose support and query share an image",
         H.episodes_support_query_overlap, ["eps.json", "episode 2", "as both support and query"]),
    Case("episodes_class_twice", "episode list naming a class twice in one episode", H.episodes_class_twice,
         ["eps.json", "episode 1", "twice"]),
    Case("episodes_fewer_ways", "episode list with 4 classes in a 5-way list", H.episodes_fewer_ways,
         ["eps.json", "episode 0", "has 4 classes", "5-way"]),
    Case("episodes_ragged_shots", "episode list with 2 support images of one class in a 1-shot list",
         H.episodes_ragged_shots, ["eps.json", "episode 4", "2 support images", "1-shot"]),
    Case("episodes_float_rank", "episode list with a rank 2.5", H.episodes_float_rank,
         ["eps.json", "episode 3", "2.5", "non-negative integers"]),
    Case("episodes_other_split", "--episodes list of the val split for a test run", H.episodes_other_split,
         ["eps.json", "val split", "eval.split"]),
    Case("episodes_fifo", "--episodes pointing at a FIFO (would block forever)", H.episodes_fifo,
         ["eps.json", "FIFO", "not a regular file"]),
    Case("episodes_deeply_nested", "episode list of 100,000 nested JSON arrays", H.episodes_deeply_nested,
         ["eps.json", "nested too deeply"]),
    # --- issue 11: configs and settings
    Case("yaml_include_cycle", "config files that include each other", H.yaml_include_cycle,
         ["a.yaml", "includes itself", "b.yaml"]),
    Case("yaml_alias_bomb", "YAML alias bomb (10^10 values from 100 lines)", H.yaml_alias_bomb,
         ["bomb.yaml", "expands to more than"]),
    Case("yaml_deeply_nested", "YAML config nested 50,000 levels deep", H.yaml_deeply_nested,
         ["deep.yaml", "nested too deeply"]),
    Case("csv_same_file_twice", "a CSV listing one image under two names (a symlink)", H.csv_same_file_twice,
         ["test.csv", "alias.png", "the same file as test0_0.png", "through a link"]),
    Case("csv_dot_duplicate", "a CSV listing test0_0.png and ./test0_0.png", H.csv_dot_duplicate,
         ["test.csv", "test0_0.png", "already listed"]),
    Case("zero_episodic_steps", "episodic.steps: 0", H.zero_episodic_steps, ["episodic.steps must be at least 1"]),
    Case("zero_meta_batch", "episodic.meta_batch: 0", H.zero_meta_batch, ["episodic.meta_batch must be at least 1"]),
    Case("zero_checkpoint_every", "episodic.checkpoint_every: 0", H.zero_checkpoint_every,
         ["episodic.checkpoint_every must be at least 1"]),
    Case("zero_pretrain_batch", "pretrain.batch_size: 0", H.zero_batch_size, ["pretrain.batch_size must be at least 1"]),
    Case("zero_training_queries", "episodic.queries: 0", H.zero_train_queries, ["episodic.queries must be at least 1"]),
    Case("negative_seed", "--seed -1", H.negative_seed, ["seed must be in 0 .. 2**63-1", "-1"]),
    Case("huge_seed", "--seed 2**64", H.huge_seed, ["seed must be in 0 .. 2**63-1"]),
    Case("huge_image_size", "--image-size 100000", H.huge_image_size, ["image_size 100000", "does not fit in memory"]),
    # --- issue 11: data paths
    Case("csv_absolute_path", "a CSV row naming an absolute path outside the data root", H.csv_absolute_path,
         ["test.csv", "outside", "no absolute paths"]),
    Case("csv_parent_path", "a CSV row naming ../outside.png", H.csv_parent_path, ["test.csv", "../outside.png", "outside"]),
    Case("image_symlink_loop", "an image that is a symlink to itself", H.image_symlink_loop, ["loop.png", "symlink loop"]),
    Case("image_is_fifo", "an image that is a FIFO (would block forever)", H.image_is_fifo, ["pipe.png", "FIFO"]),
    Case("folder_symlink_loop", "a class folder holding a symlink back to the data root", H.dir_symlink_loop,
         ["again", "symlink loop"]),
    # --- issue 11: outputs
    Case("results_dir_under_a_file", "--results-dir below a regular file", H.results_dir_under_a_file,
         ["results folder", "a_file", "not writable"]),
    Case("cache_dir_read_only", "--cache-dir on a read-only file system (/proc)", H.cache_dir_read_only,
         ["cache folder", "/proc/fewshot-cache", "not writable"]),
    Case("foreign_leaderboard_header", "a leaderboard.csv with another tool's header", lambda tmp: (TEMPLATE_ARGS, None),
         ["leaderboard.csv", "not a leaderboard written by fewshot-nsl", "unknown column(s) name"],
         extra={"prepare": H._foreign_board(b"name,score\nfoo,1\n")}),
    Case("binary_leaderboard", "a binary file saved as leaderboard.csv", lambda tmp: (TEMPLATE_ARGS, None),
         ["leaderboard.csv", "binary"], extra={"prepare": H._foreign_board(b"PK\x03\x04\x00\x00binary")}),
    Case("torn_leaderboard", "a leaderboard.csv whose last row is torn", lambda tmp: (TEMPLATE_ARGS, None),
         ["leaderboard.csv", "torn row"], extra={"prepare": "torn"}),
    Case("report_with_bad_leaderboard", "--report over a foreign leaderboard.csv (reports are kept)",
         lambda tmp: (["--report"], None), ["leaderboard.csv", "not a leaderboard written by fewshot-nsl"],
         extra={"prepare": H._foreign_board(b"name,score\nfoo,1\n")}),
    Case("foreign_run_identity", "a run folder whose identity.json names other data", lambda tmp: (
        [*TEMPLATE_ARGS, "--config", str(_template_config(tmp))], None),
         ["holds a run of another identity", "dataset_fingerprint", "move it away"],
         extra={"prepare": H.prepare_foreign_identity}),
    # --- issue 11: the harness checks what a method returns
    Case("logits_wrong_shape", "a plugin's forward returns logits (1, ways)", H.plugin_method("logits_one_row"),
         ["logits_one_row", "shape (1, 5)", "test episode 0", "(15, 5)"], writes_run=True),
    Case("logits_one_dimensional", "a plugin's forward returns 1-D logits", H.plugin_method("logits_flat"),
         ["logits_flat", "shape (75,)", "(n_query, ways)"], writes_run=True),
    Case("method_raises", "a plugin raises inside fit_support", H.plugin_method("raises_in_fit_support"),
         ["raises_in_fit_support raised RuntimeError in fit_support on test episode 0", "plugin bug", "error.txt"],
         writes_run=True),
    # --- run time
    Case("nan_training_loss", "training loss turns NaN at step 4 (faulty plugin method)", H.nan_training_loss,
         ["nan_after_steps training loss at step 4", "(training episode 4, classes ", "NaN or Inf", "kept"], writes_run=True),
    Case("tampered_checkpoint", "checkpoint.pt replaced by a pickle whose payload calls os.system",
         H.tampered_checkpoint, ["refusing to load ", "checkpoint.pt", "posix.system", "tampered", "delete it and rerun"],
         extra={"prepare": H.prepare_tampered_checkpoint}),
    Case("truncated_checkpoint", "checkpoint.pt cut in half (full disk, interrupted copy)",
         H.truncated_checkpoint, ["cannot read ", "checkpoint.pt", "truncated or corrupt", "delete it and rerun"],
         extra={"prepare": H.prepare_truncated_checkpoint}),
    Case("cuda_out_of_memory", "CUDA out of memory during evaluation (simulated)", lambda tmp: (TEMPLATE_ARGS, None),
         ["out of GPU memory", "meta-batch", "--image-size", "first_order"], code=3, writes_run=True,
         extra={"raise_on_episode": (2, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))}),
    Case("ctrl_c", "Ctrl-C during evaluation (KeyboardInterrupt after 3 episodes)", lambda tmp: (TEMPLATE_ARGS, None),
         ["interrupted", "run the same command again to resume"], code=130, writes_run=True,
         extra={"raise_on_episode": (3, KeyboardInterrupt())}),
]

def _template_config(tmp: Path) -> Path:
    path = tmp / "template.yaml"
    path.write_text(TEMPLATE_CONFIG)
    return path


def _tear_last_row(run, results: Path, tmp: Path):
    data = (results / "leaderboard.csv").read_bytes()
    (results / "leaderboard.csv").write_bytes(data[:-7])
    return lambda: None


# A finished run that every case's results folder starts with.
TEMPLATE_ARGS = [*H.TINY_ARGS, "--method", "protonet", "--shots", "1", "--n-episodes", "6", "--queries", "3"]
# one episode per call (the per-episode path, seeded per episode), so the tests' seed hooks count episodes
TEMPLATE_CONFIG = "episodic: {steps: 2, checkpoint_every: 1, queries: 3}\neval: {batch_episodes: 1}\n"

LAST_STDOUT: List[str] = [""]
OUTCOMES: Dict[str, Tuple[bool, int, str]] = {}  # case id -> (refused cleanly, files lost or changed, error line)


def snapshot(root: Path) -> Dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root``."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def base_args(results: Path, cache: Path) -> List[str]:
    return ["--results-dir", str(results), "--cache-dir", str(cache), "--no-progress", "--profile", "smoke"]


def run_in_process(argv: List[str], capsys) -> Tuple[int, str]:
    """``(exit status, stderr)`` of ``cli.main(argv)``; its stdout is kept in ``LAST_STDOUT``."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    except BaseException as exc:  # noqa: BLE001 - anything escaping main is a failure of the guard
        out = capsys.readouterr()
        pytest.fail(f"cli.main raised {type(exc).__name__}: {exc}\n{out.err}")
    out = capsys.readouterr()
    LAST_STDOUT[:] = [out.out]
    return code, out.err


def run_subprocess(argv: List[str], tmp_path: Path) -> Tuple[int, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", FEWSHOT_NSL_CACHE=str(tmp_path / "env-cache"))
    proc = subprocess.run([sys.executable, str(REPO / "run_benchmarks.py"), *argv], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A results folder with a leaderboard and one finished run (a real tiny CLI run)."""
    base = tmp_path_factory.mktemp("template")
    cfg = base / "template.yaml"
    cfg.write_text(TEMPLATE_CONFIG)
    argv = base_args(base / "results", base / "cache") + TEMPLATE_ARGS + ["--config", str(cfg)]
    assert cli.main(argv) == 0
    results = base / "results"
    assert (results / "leaderboard.csv").is_file() and len(list((results / "runs").iterdir())) == 1
    return results


@pytest.fixture
def results(template, tmp_path) -> Path:
    dst = tmp_path / "results"
    shutil.copytree(template, dst)
    return dst


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_cleanly_and_nothing_lost(case: Case, results: Path, tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    args, post_check = case.build(inputs)
    argv = base_args(results, tmp_path / "cache") + list(args)
    if "prepare" in case.extra:  # a state left in the results folder by an earlier run
        prepare = _tear_last_row if case.extra["prepare"] == "torn" else case.extra["prepare"]
        post_check = prepare(lambda: run_in_process(argv, capsys), results, inputs)
    before = snapshot(results)
    if "raise_on_episode" in case.extra:  # fail inside evaluation, after some episodes are written
        n, exc = case.extra["raise_on_episode"]
        import fewshot_nsl.evaluation as evaluation

        real, calls = evaluation.seed_torch, []

        def failing_seed(*a, **k):
            calls.append(1)
            if len(calls) > n:
                raise exc
            return real(*a, **k)

        monkeypatch.setattr(evaluation, "seed_torch", failing_seed)
        cfg = tmp_path / "template.yaml"
        cfg.write_text(TEMPLATE_CONFIG)
        argv += ["--config", str(cfg), "--seed", "7"]  # a new run next to the finished one
    if case.subprocess:
        code, err = run_subprocess(argv, tmp_path)
    else:
        code, err = run_in_process(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    after = snapshot(results)
    lost = [p for p, h in before.items() if after.get(p) != h]
    added = sorted(set(after) - set(before))
    line = lines[0] if lines else ""
    clean = (code == case.code and len(lines) == 1 and "Traceback" not in err
             and line.startswith("interrupted: " if case.code == 130 else "error: ")
             and all(f in line for f in case.fragments))
    if not case.writes_run and added:
        clean = False
    OUTCOMES[case.id] = (clean, len(lost), line)
    assert code == case.code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in case.fragments:
        assert fragment in line, line
    assert not lost, f"files changed or lost: {lost}"
    if case.writes_run:
        assert all(p.startswith(("runs/", "episodes/")) for p in added), added
    else:
        assert not added, f"files written: {added}"
    if post_check:
        post_check()


def test_ctrl_c_keeps_finished_episodes_and_resumes(results, tmp_path, capsys, monkeypatch):
    """After the interrupt the rerun completes, evaluating only the episodes that were missing."""
    import fewshot_nsl.evaluation as evaluation

    cfg = tmp_path / "template.yaml"
    cfg.write_text(TEMPLATE_CONFIG)
    argv = base_args(results, tmp_path / "cache") + TEMPLATE_ARGS + ["--config", str(cfg), "--seed", "7"]
    real, calls = evaluation.seed_torch, []

    def interrupting(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(evaluation, "seed_torch", interrupting)
    seed0 = next((results / "runs").iterdir())
    seed0_files = snapshot(seed0)
    assert run_in_process(argv, capsys)[0] == 130
    run = next(d for d in (results / "runs").iterdir() if "seed7" in d.name)
    assert len(pd.read_csv(run / "episodes.csv")) == 3
    calls.clear()
    monkeypatch.setattr(evaluation, "seed_torch", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert run_in_process(argv, capsys)[0] == 0
    assert len(calls) == 3  # only episodes 3, 4, 5 were evaluated again
    assert list(pd.read_csv(run / "episodes.csv")["episode"]) == list(range(6))
    # one leaderboard row per cell, aggregating every finished seed of the experiment (the fixture's seed 0 and
    # seed 7); the seed-0 run folder is untouched
    assert list(pd.read_csv(results / "leaderboard.csv")["seeds"].astype(str)) == ["0,7"]
    assert snapshot(seed0) == seed0_files


def test_noncanonical_split_is_accepted_when_asked(results, tmp_path, capsys):
    """The same 15-of-16-classes source runs with allow_noncanonical_split; the old results stay."""
    root = H.split_missing_a_class(tmp_path, per_class=2)
    cfg = H.yaml_config(tmp_path, H.NONCANONICAL + "episodic: {steps: 2, queries: 1}\neval: {episodes: 4, queries: 1}\n")
    old_lb = pd.read_csv(results / "leaderboard.csv")
    old_run = snapshot(next((results / "runs").iterdir()))
    argv = base_args(results, tmp_path / "cache") + H.mini_args(root, "--config", str(cfg)) + [
        "--ways", "2", "--shots", "1", "--image-size", "16"]
    code, err = run_in_process(argv, capsys)
    assert code == 0, err
    lb = pd.read_csv(results / "leaderboard.csv")
    assert sorted(lb["dataset"]) == ["miniimagenet", "tiny"]
    pd.testing.assert_frame_equal(lb[lb["dataset"] == "tiny"].reset_index(drop=True)[old_lb.columns], old_lb)
    assert snapshot(results / "runs" / old_lb["run_id"][0]) == old_run


def test_broken_plugin_leaves_the_other_methods_working(tmp_path, capsys):
    """The broken plugin is named (in --list and in the run log) and protonet still runs."""
    args, _ = H.broken_plugin(tmp_path)
    plugins = args[args.index("--plugins") + 1]
    code, err = run_in_process(["--plugins", plugins, "--list"], capsys)
    assert code == 0 and not err.strip(), err
    assert "protonet" in LAST_STDOUT[0] and "my_method.py not loaded: RuntimeError: boom" in LAST_STDOUT[0]
    cfg = tmp_path / "template.yaml"
    cfg.write_text(TEMPLATE_CONFIG)
    argv = base_args(tmp_path / "results", tmp_path / "cache") + ["--plugins", plugins, *TEMPLATE_ARGS,
                                                                 "--config", str(cfg)]
    code, err = run_in_process(argv, capsys)
    assert code == 0 and not err.strip(), err
    assert "warning: plugin" in LAST_STDOUT[0] and "my_method.py failed to import" in LAST_STDOUT[0]
    assert list(pd.read_csv(tmp_path / "results" / "leaderboard.csv")["method"]) == ["protonet"]


def test_catalogue_figure(capsys):
    """The figure for docs/robustness.md (needs the whole module to have run)."""
    if len(OUTCOMES) < len(CASES):
        pytest.skip("run the whole catalogue module for the figure")
    refused = sum(ok for ok, _, _ in OUTCOMES.values())
    lost = sum(n for _, n, _ in OUTCOMES.values())
    figure = f"{len(CASES)} hostile or broken inputs tried, {refused} refused cleanly, {lost} results lost"
    with capsys.disabled():
        print("\n" + figure)
    target = os.environ.get("HOSTILE_CATALOGUE_MD")
    if target:
        rows = ["| # | input | the one line the user sees | test |", "|---|---|---|---|"]
        for i, c in enumerate(CASES, 1):
            line = re.sub(r"/\S*?/(inputs|results)\b", r"…/\1", OUTCOMES[c.id][2])
            line = line.replace(str(REPO), "<repo>").replace("|", "\\|")  # no machine paths in the docs
            via = " (subprocess)" if c.subprocess else ""
            rows.append(f"| {i} | {c.what} | `` {line} `` | `[{c.id}]`{via} |")
        Path(target).write_text(figure + "\n\n" + "\n".join(rows) + "\n")
    assert refused == len(CASES) and lost == 0, figure
