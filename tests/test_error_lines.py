"""Issue 25, item 8: every remaining traceback on bad input becomes one ``error:`` line (exit status 2),
before any run folder is created; the Python API raises the suite's own exception for the same inputs.
Also: numbers written ``1e-4`` / ``5e-1`` in ``--set`` and config files are floats (YAML 1.1 reads them
as strings), and a ``--config`` file's ``method:`` is not silently replaced by the default method.

In process on the tiny dataset with a one-step budget, so that a case the old code let through
fails the test quickly (and leaves its run folder behind, which the test also checks).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewshot_nsl.cli import main
from fewshot_nsl.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
PLUGINS = str(REPO / "tests" / "plugins")
#: Tiny data, one training step, two test episodes: seconds even where the old code trained.
FAST = ["--plugins", PLUGINS, "--dataset", "tiny", "--profile", "smoke", "--method", "protonet", "--n-episodes", "2",
        "--queries", "5", "--set", "episodic.steps=1", "--set", "episodic.queries=2", "--no-progress"]


def run_cli(tmp_path: Path, capsys, args, base=FAST):
    """``(exit status, non-empty stderr lines, results folder)`` of one in-process CLI call (stdout in
    ``run_cli.out``)."""
    results = tmp_path / "results"
    threads = torch.get_num_threads()
    try:
        code = main(["--results-dir", str(results), *base, *args])
    except SystemExit as exc:  # argparse's own errors (our one-line _Parser.error) exit
        code = exc.code
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    run_cli.out = captured.out
    err = [line for line in captured.err.splitlines() if line.strip()]
    return code, err, results


def assert_one_error_line(code, err, results, *fragments):
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for f in fragments:
        assert f in err[0], err[0]
    runs = results / "runs"
    assert not runs.exists() or not any(runs.iterdir()), f"a run folder was created: {list(runs.iterdir())}"


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- --set / flags
@pytest.mark.parametrize(
    "args,fragments",
    [
        # keys of dataset_options / method_options / backbone_options the harness passes itself
        (["--set", "dataset_options.data_root=/tmp"], ["dataset_options.data_root", "--data-root"]),
        (["--set", "dataset_options.image_size=16"], ["dataset_options.image_size", "--image-size"]),
        (["--set", "dataset_options.cache_dir=/tmp"], ["dataset_options.cache_dir", "--cache-dir"]),
        (["--set", "dataset_options.name=tiny"], ["dataset_options.name", "--dataset"]),
        (["--set", "method_options.image_size=16"], ["method_options.image_size", "--image-size"]),
        (["--set", "method_options.backbone=cnn9"], ["method_options.backbone", "--backbone"]),
        (["--set", "backbone_options.conv_layer=null"], ["backbone_options.conv_layer", "conv"]),
        # non-positive or mistyped backbone widths and options
        (["--set", "backbone_options.filters=0"], ["cnn4", "filters", "positive integer", "0"]),
        (["--set", "backbone_options.filters=-3"], ["cnn4", "filters", "-3"]),
        (["--set", "backbone_options.filters=2.5"], ["cnn4", "filters", "2.5"]),
        (["--set", "backbone_options.filters=true"], ["cnn4", "filters", "True"]),
        (["--backbone", "cnn9", "--set", "backbone_options.widths=[32,-1,64]"], ["cnn9", "widths", "-1"]),
        (["--backbone", "cnn9", "--set", "backbone_options.widths=[32,64]"], ["cnn9", "widths", "3 values"]),
        (["--backbone", "cnn9", "--set", "backbone_options.widths=32"], ["cnn9", "widths", "list"]),
        (["--backbone", "cnn9", "--set", "backbone_options.stem=0"], ["cnn9", "stem"]),
        (["--set", "backbone_options.padding=-1"], ["cnn4", "padding", "-1"]),
        (["--set", "backbone_options.padding=1.5"], ["cnn4", "padding", "1.5"]),
        (["--set", "backbone_options.pool=[true,true]"], ["pool", "4 values"]),
        (["--set", "backbone_options.pool=maybe"], ["cnn4", "pool", "maybe"]),
        (["--set", "backbone_options.bn_eps=0"], ["cnn4", "bn_eps", "positive"]),
        (["--set", "backbone_options.filters=100000"], ["cnn4", "parameters", "lower its widths"]),  # 360 GB
        # image sizes too small for the backbone's layers
        (["--image-size", "12"], ["backbone cnn4", "at least 16 px", "image_size 12"]),
        (["--image-size", "32", "--set", "backbone_options.padding=0"], ["backbone cnn4", "at least 46 px", "32"]),
        (["--image-size", "8", "--set", "backbone_options.pool=[true,true,false,false]",
          "--set", "backbone_options.padding=[0,0,1,1]"], ["backbone cnn4", "at least 10 px", "image_size 8"]),
        # --seeds outside what the RNGs take
        (["--seeds", "-1"], ["seed", "-1", "0 .. 2**63-1"]),
        (["--seeds", "0,-5"], ["seed", "-5"]),
        (["--seeds", str(2**63)], ["seed", str(2**63)]),
        # an invalid conv spec: refused before the run folder exists
        (["--set", "conv.kind=bogus"], ["conv", "bogus", "plain, static, dynamic"]),
        (["--set", "conv.kind=5"], ["conv", "kind", "5"]),
        (["--set", "conv.kind=static", "--set", "conv.structure=xyz"], ["conv", "structure", "xyz", "dns, uns"]),
        (["--set", "conv.kind=dynamic", "--set", "conv.hidden=0"], ["conv", "hidden", "positive integer"]),
        (["--set", "conv.kind=dynamic", "--set", "conv.hidden=16.5"], ["conv", "hidden", "16.5"]),
        (["--set", "conv.kind=dynamic", "--set", "conv.bogus=1"], ["conv", "bogus", "accepted"]),
        (["--set", "conv.kind=static", "--set", "conv.predictor=cnn"], ["conv", "predictor", "static"]),
        (["--set", "conv.kind=dynamic", "--set", "conv.predictor_bn_eps=0"], ["conv", "predictor_bn_eps", "positive"]),
        (["--set", "conv.kind=dynamic", "--set", "conv.learn_shape=yes please"], ["conv", "learn_shape", "true or false"]),
        (["--set", "conv.kind=dynamic", "--set", "conv.structure=uns", "--set", "conv.side=taps"],
         ["conv", "taps", "dns"]),
        (["--set", "conv.structure=uns"], ["conv sets structure", "plain", "conv.kind"]),  # was ignored silently
        # threads the OS cannot give
        (["--threads", str(10**20)], ["--threads", "at most"]),
        # an empty value (an unset shell variable) is not the default
        (["--config", ""], ["--config", "empty value"]),
        (["--grid", " "], ["--grid", "empty value"]),
        (["--plugins", ""], ["--plugins", "empty value"]),
        (["--episodes", ""], ["--episodes", "empty value"]),
        (["--method", ""], ["--method", "empty value"]),
        (["--results-dir", ""], ["--results-dir", "empty value"]),
        # what a user typed is quoted on the one line, control characters escaped
        (["\r"], ["unrecognized arguments", "\\r"]),
        (["--config", "a\nb.yaml"], ["a\\nb.yaml", "does not exist"]),
        # paths no file system takes (OSError: File name too long, deep in a loader, before)
        (["--config", "c" * 300], ["--config", "300 bytes long, more than 255"]),
        (["--grid", "g" * 300], ["--grid", "not a usable path"]),
        (["--episodes", "e" * 300], ["--episodes", "not a usable path"]),
        (["--plugins", "p" * 300], ["--plugins", "not a usable path"]),
        (["--data-root", "/tmp/" + "d" * 300], ["--data-root", "not a usable path"]),
    ],
)
def test_bad_cli_input_is_one_error_line_before_any_run_folder(tmp_path, capsys, args, fragments):
    code, err, results = run_cli(tmp_path, capsys, args)
    assert_one_error_line(code, err, results, *fragments)


# ----------------------------------------------------------------------------- config files
@pytest.mark.parametrize(
    "text,fragments",
    [
        ("dataset_options: {image_size: 16}\n", ["dataset_options.image_size", "--image-size"]),
        ("backbone_options: {filters: 0}\n", ["cnn4", "filters"]),
        ("image_size: 12\n", ["backbone cnn4", "at least 16 px"]),
        ("conv: {kind: dynamic, hidden: 0}\n", ["conv", "hidden"]),
        ("methods: {protonet: {conv: {kind: static, structure: xyz}}}\n", ["conv", "structure", "xyz"]),
        ("method: [protonet, maml]\n", ["method", "protonet"]),
        # a key written twice: PyYAML keeps the last one silently (here: the lr is lost)
        ("pretrain: {lr: 0.1}\nepisodic: {steps: 1}\npretrain: {epochs: 2}\n",
         ["duplicate key 'pretrain'", "line 3"]),
    ],
)
def test_bad_config_file_is_one_error_line(tmp_path, capsys, text, fragments):
    path = write(tmp_path, "bad.yaml", text)
    base = [a for a in FAST if a not in ("--method", "protonet")]  # the file's method applies
    code, err, results = run_cli(tmp_path, capsys, ["--config", path], base=base)
    assert_one_error_line(code, err, results, *fragments)


# ----------------------------------------------------------------------------- grid files
@pytest.mark.parametrize(
    "text,fragments",
    [
        ("rows: 5\n", ["rows", "list"]),
        ("rows: {method: protonet}\n", ["rows", "list"]),
        ("grid: 5\n", ["grid", "mapping"]),
        ("grid: [protonet]\n", ["grid", "mapping"]),
        ("rows:\n  - {method: protonet, shots: 1.9}\n", ["rows[0].shots", "1.9", "positive integer"]),
        ("rows:\n  - {method: protonet, shots: true}\n", ["rows[0].shots", "True"]),
        ("rows:\n  - {method: protonet, shots: '5'}\n", ["rows[0].shots", "'5'"]),
        ("rows:\n  - {method: protonet, shots: abc}\n", ["rows[0].shots", "abc"]),
        ("rows:\n  - {method: protonet, shots: 0}\n", ["rows[0].shots", "0"]),
        ("rows:\n  - {method: protonet, backbone: 5, shots: 1}\n", ["rows[0].backbone", "5"]),
        ("rows:\n  - {method: [protonet], shots: 1}\n", ["rows[0].method", "protonet"]),
        ("rows:\n  - {method: null}\n", ["rows[0].method"]),
        ("rows:\n  - {method: protonet, shots: 2, ways: 20}\n", ["rows[0]", "ways", "--ways"]),
        ("rows:\n  - {method: protonet, shots: 2, label: [x]}\n", ["rows[0].label"]),
        ("rows:\n  - {method: protonet, shots: 2, paper: high}\n", ["rows[0].paper", "high"]),
        ("grid: {method: protonet, shots: [1.9, 5]}\n", ["grid.shots", "1.9"]),
        ("grid: {method: protonet, shots: [true]}\n", ["grid.shots", "True"]),
        ("grid: {method: protonet, shots: 1e1}\n", ["grid.shots", "10.0"]),
        ("grid: {method: [protonet], backbone: [[cnn4]]}\n", ["grid.backbone", "cnn4"]),
        ("grid: {method: {a: 1}}\n", ["grid.method"]),
        ("rows:\n  - {method: protonet, shots: 2}\nprofile: paper\n", ["profile", "--profile"]),
        ("rows:\n  - {method: protonet, shots: 2, shots: 1}\n", ["duplicate key 'shots'"]),
    ],
)
def test_bad_grid_file_is_one_error_line(tmp_path, capsys, text, fragments):
    path = write(tmp_path, "grid.yaml", text)
    base = [a for a in FAST if a not in ("--method", "protonet")]  # --method would filter the grid
    code, err, results = run_cli(tmp_path, capsys, ["--grid", path], base=base)
    assert_one_error_line(code, err, results, "grid file", *fragments)


def test_grid_file_error_in_a_real_process_has_no_traceback(tmp_path):
    path = write(tmp_path, "grid.yaml", "rows: 5\n")
    proc = subprocess.run([sys.executable, str(REPO / "run_benchmarks.py"), "--results-dir", str(tmp_path / "r"),
                           "--no-progress", "--grid", path], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: grid file"), proc.stderr


# ----------------------------------------------------------------------------- the Python API
@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"seeds": [-1]}, "seed"),
        ({"seeds": [1.5]}, "seed"),
        ({"seeds": [True]}, "seed"),
        ({"backbone_options": {"filters": 0}}, "filters"),
        ({"image_size": 12}, "at least 16 px"),
        ({"conv": {"kind": "bogus"}}, "bogus"),
        ({"dataset_options": {"image_size": 16}}, "dataset_options.image_size"),
        ({"config": "c" * 300}, "cannot be read"),
    ],
)
def test_python_api_raises_the_suites_error_before_any_run_folder(tmp_path, kwargs, fragment):
    import fewshot_nsl

    results = tmp_path / "results"
    threads = torch.get_num_threads()
    try:
        with pytest.raises(ConfigError, match=None) as info:
            fewshot_nsl.benchmark("protonet", shots=5, dataset="tiny", plugins=[PLUGINS], profile="smoke",
                                  results_dir=str(results), eval={"episodes": 2, "queries": 5},
                                  episodic={"steps": 1, "queries": 2}, threads=1, **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    assert not (results / "runs").exists() or not any((results / "runs").iterdir())


# ----------------------------------------------------------------------------- numbers in YAML
@pytest.mark.parametrize(
    "text,value",
    [("1e-4", 1e-4), ("5e-1", 0.5), ("1E3", 1000.0), ("-2e-3", -2e-3), ("+1e2", 100.0), (".5", 0.5),
     ("1.0e-5", 1e-5), ("3", 3), ("1_000", 1000), ("0x10", 16), (".inf", float("inf")), ("e5", "e5"),
     ("1e", "1e"), ("'1e-4'", "1e-4"), ("1.2.3", "1.2.3"), ("true", True), ("2024-01-01e5", "2024-01-01e5")],
)
def test_yaml_numbers_with_exponents_are_floats(text, value):
    from fewshot_nsl.config import parse_yaml

    got = parse_yaml(text)
    assert got == value and type(got) is type(value)


def test_exponent_numbers_in_set_and_config_files_are_floats(tmp_path):
    from fewshot_nsl.config import parse_set_options, resolve_config

    assert parse_set_options(["pretrain.lr=1e-4", "episodic.lr=5e-1"]) == {"pretrain": {"lr": 1e-4},
                                                                            "episodic": {"lr": 0.5}}
    inc = write(tmp_path, "inc.yaml", "pretrain: {weight_decay: 1e-3}\n")
    cfg_file = write(tmp_path, "c.yaml", f"include: {inc}\npretrain: {{lr: 5e-1}}\n"
                                         "methods: {protonet: {episodic: {lr: 2e-4}}}\n")
    cfg = resolve_config({"method": "protonet", "profile": "smoke"}, cfg_file)
    assert (cfg.pretrain.lr, cfg.pretrain.weight_decay, cfg.episodic.lr) == (0.5, 1e-3, 2e-4)
    with pytest.raises(ConfigError, match="episodic.steps must be int"):  # an int key is not rounded from a float
        parse_set_options(["episodic.steps=1e4"])
    # the run's config.yaml reads back as the run's config: a string that looks like a float stays a string
    from fewshot_nsl.config import save_config

    cfg = resolve_config({"method": "protonet", "profile": "smoke", "data_root": "1e-4",  # a folder named 1e-4
                          "dataset_options": {"version": "5e-1"}, "pretrain": {"lr": 1e-4}})
    save_config(cfg, tmp_path / "config.yaml")
    back = resolve_config({}, str(tmp_path / "config.yaml"))
    assert back.to_dict() == cfg.to_dict() and back.hash() == cfg.hash()


def test_repeated_shots_or_methods_are_one_cell(tmp_path, capsys):
    code, err, _ = run_cli(tmp_path, capsys, ["--shots", "2,2", "--method", "protonet,protonet", "--dry-run"])
    assert code == 0, err
    assert run_cli.out.count("to run:") == 1, run_cli.out


def test_a_float_for_an_integer_key_says_how_to_write_it():
    from fewshot_nsl.config import parse_set_options

    with pytest.raises(ConfigError, match=r"episodic.steps must be int, got 10000.0 \(write a whole number .*: 10000\)"):
        parse_set_options(["episodic.steps=1e4"])


def test_config_file_method_is_not_replaced_by_the_default(tmp_path, capsys):
    path = write(tmp_path, "c.yaml", "method: nearest_neighbor\n")
    base = [a for a in FAST if a not in ("--method", "protonet")]
    code, err, results = run_cli(tmp_path, capsys, ["--config", path, "--dry-run"], base=base)
    assert code == 0, err
    out = run_cli.out
    assert "nearest_neighbor" in out and "protonet" not in out, out


# ----------------------------------------------------------------------------- backbone minimum sizes
@pytest.mark.parametrize(
    "name,options",
    [("cnn4", {}), ("cnn4", {"padding": 0}), ("cnn4", {"filters": 8, "pool": [True, True, False, False],
                                                       "padding": [0, 0, 1, 1]}),
     ("cnn4", {"pool": False, "padding": 0}), ("cnn9", {"widths": [4, 4, 4], "stem": 4}),
     ("cnn9", {"widths": [4, 4, 4], "stem": 4, "ceil_pool": False})],
)
def test_backbone_minimum_is_exactly_what_its_layers_accept(name, options):
    """The minimum computed from the layers runs, one pixel less fails in torch; the check agrees."""
    from fewshot_nsl.backbones import check_image_size
    from fewshot_nsl.registry import create_backbone

    net = create_backbone(name, **options).eval()
    m = net.min_image_size()
    with torch.no_grad():
        assert net(torch.zeros(2, 3, m, m)).shape[0] == 2
        if m > 1:
            with pytest.raises(RuntimeError):
                net(torch.zeros(2, 3, m - 1, m - 1))
    check_image_size(name, options, m)
    if m > 1:
        with pytest.raises(ConfigError, match=f"needs images of at least {m} px"):
            check_image_size(name, options, m - 1)


def test_minimum_holds_with_neural_similarity_convs_and_without_a_layer_walk(monkeypatch):
    from fewshot_nsl.backbones import CNN4, check_image_size, min_input_size
    from fewshot_nsl.nn import make_conv_factory

    dynamic = CNN4(filters=4, padding=0, conv_layer=make_conv_factory("dynamic", structure="dns"))
    assert min_input_size(dynamic.blocks) == 46  # the predictors beside each conv do not count as layers
    monkeypatch.setattr(CNN4, "min_image_size", lambda self: None)  # a backbone that does not say: a meta forward
    check_image_size("cnn4", {"padding": 0}, 46)
    with pytest.raises(ConfigError, match="too small for backbone cnn4"):
        check_image_size("cnn4", {"padding": 0}, 45)


@pytest.mark.parametrize("kwargs, match", [
    ({"shots": 1.9}, "shots must be positive integers"),
    ({"shots": True}, "shots must be positive integers"),
    ({"shots": "1,x"}, "shots must be positive integers"),
    ({"threads": 0}, r"benchmark\(threads=0\)"),
    ({"threads": 10**20}, "threads must be an integer in 1..1024"),
])
def test_api_refuses_bad_shots_and_threads_in_one_line(tmp_path, kwargs, match):
    """benchmark(shots=1.9) used to round to 1 and threads=10**20 to overflow (issue 25, part 8)."""
    import fewshot_nsl
    from fewshot_nsl.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        fewshot_nsl.benchmark(method="protonet", profile="smoke", results_dir=str(tmp_path / "r"), **kwargs)
    assert not (tmp_path / "r" / "runs").exists()


@pytest.mark.parametrize("options, match", [
    ({"relation_padding": 0}, "too small for two 3x3 relation convs"),
    ({"hidden": 0}, "hidden must be an integer of at least 1"),
])
def test_relationnet_impossible_options_are_one_line_before_any_run_folder(tmp_path, capsys, options, match):
    from fewshot_nsl.cli import main

    argv = ["--method", "relationnet", "--profile", "smoke", "--image-size", "32", "--n-episodes", "2",
            "--results-dir", str(tmp_path / "r")]
    for k, v in options.items():
        argv += ["--set", f"method_options.{k}={v}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and re.search(match, err[0]), err
    assert not (tmp_path / "r" / "runs").exists()
