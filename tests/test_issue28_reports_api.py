"""Issue 28 (items 1-6, 10): --reference does not persist, one results folder, the API (paths, bad
arguments, compare, load_method, method_options), filtered reports, --forget, LaTeX, the plot's
families, --dataset-name, the small-split warning and --list --method. In process, tiny dataset."""
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import fewshot_nsl
from fewshot_nsl.cli import main
from fewshot_nsl.errors import ConfigError
from fewshot_nsl.reporting import method_family, read_leaderboard, upsert_row

REPO = Path(__file__).resolve().parent.parent
PLUGINS = REPO / "tests" / "plugins"
TINY = ["--plugins", str(PLUGINS), "--dataset", "tiny", "--image-size", "16", "--profile", "smoke",
        "--n-episodes", "6", "--queries", "5", "--no-progress", "--threads", "1"]
API_TINY = dict(dataset="tiny", image_size=16, profile="smoke", eval={"episodes": 6, "queries": 5}, threads=1)


def cli(capsys, *args):
    threads = torch.get_num_threads()
    try:
        code = main(list(args))
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def two_methods(tmp_path_factory):
    """A results folder with protonet and nearest_neighbor 2-shot rows on tiny (smoke), run once."""
    root = tmp_path_factory.mktemp("board")
    threads = torch.get_num_threads()
    try:
        assert main(["--results-dir", str(root / "results"), *TINY, "--method", "protonet,nearest_neighbor",
                     "--shots", "2", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "results"


def refs(results):
    return set(read_leaderboard(results / "leaderboard.csv")["ref_method"].dropna())


# ----------------------------------------------------------------------------- 1: --reference
def test_reference_applies_to_its_own_command_only(two_methods, capsys):
    r = ["--results-dir", str(two_methods)]
    assert cli(capsys, *r, "--report", "--reference", "nearest_neighbor")[0] == 0
    assert refs(two_methods) == {"nearest_neighbor"}
    code, out, err = cli(capsys, *r, "--report")  # no --reference: protonet, as --help says
    assert code == 0, err
    assert refs(two_methods) == {"protonet"}
    assert "Δ vs protonet" in (two_methods / "table6.md").read_text()


# ----------------------------------------------------------------------------- 2: results_dir
def test_config_results_dir_is_the_one_results_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "leaderboard.csv").write_text("not,a,leaderboard\n1,2,3\n")  # a foreign file
    (tmp_path / "cfg.yaml").write_text("results_dir: elsewhere\n")
    code, out, err = cli(capsys, *TINY, "--method", "nearest_neighbor", "--shots", "2", "--config", "cfg.yaml")
    assert code == 0, err
    closing = [line for line in (out + err).splitlines() if line.startswith("leaderboard:")]
    assert closing and "elsewhere/leaderboard.csv" in closing[0] and "results/" not in closing[0]
    assert (tmp_path / "elsewhere" / "leaderboard.csv").is_file()
    code, out, err = cli(capsys, "--config", "cfg.yaml", "--report")
    assert code == 0 and "elsewhere/table6.md" in out + err, err
    # the API writes its row there and returns it, without reading the foreign results/leaderboard.csv
    rows = fewshot_nsl.benchmark("nearest_neighbor", shots=2, config=tmp_path / "cfg.yaml", plugins=str(PLUGINS),
                                 **API_TINY)
    assert len(rows) == 1 and rows["method"].iloc[0] == "nearest_neighbor"
    assert (tmp_path / "results" / "leaderboard.csv").read_text().startswith("not,a")


# ----------------------------------------------------------------------------- 3: the API
def test_api_plugins_as_one_path_and_bad_arguments_name_the_parameter(tmp_path):
    out = str(tmp_path / "r")
    rows = fewshot_nsl.benchmark("nearest_neighbor", shots=2, plugins=PLUGINS, results_dir=out, **API_TINY)
    assert len(rows) == 1
    rows = fewshot_nsl.benchmark("nearest_neighbor", shots=2, plugins=str(PLUGINS), results_dir=out, **API_TINY)
    assert len(rows) == 1
    bad = [dict(shots="five"), dict(shots=[1, 1.5]), dict(ways=0), dict(ways=50), dict(seeds="0,1"),
           dict(plugins=3), dict(config=tmp_path / "missing.yaml"), dict(method=7), dict(profile="fast")]
    for kwargs in bad:
        args = {**dict(method="nearest_neighbor", shots=2, results_dir=out, plugins=PLUGINS), **API_TINY, **kwargs}
        with pytest.raises(ConfigError) as info:
            fewshot_nsl.benchmark(**args)
        text = str(info.value)
        name = next(iter(kwargs))
        assert f"{name}=" in text and "--" not in text and "\n" not in text, (kwargs, text)


def test_compare_and_load_method(two_methods, capsys):
    board = fewshot_nsl.load_results(two_methods)
    ids = dict(zip(board["method"], board["run_id"]))
    stats = fewshot_nsl.compare(ids["nearest_neighbor"], ids["protonet"], results_dir=two_methods)
    assert isinstance(stats, pd.DataFrame) and len(stats) == 1
    code, out, _ = cli(capsys, "--results-dir", str(two_methods), "--compare", ids["nearest_neighbor"], ids["protonet"])
    assert f"A - B: {stats['diff'].iloc[0]:+.2f}" in out and stats["n_paired"].iloc[0] == 6
    from conftest import make_tiny_store

    store = make_tiny_store()
    model = fewshot_nsl.load_method(two_methods / "runs" / ids["protonet"], plugins=PLUGINS)
    test = store.classes_in_split("test")[:3]
    names = np.array(["cat", "dog", "emu"])
    sup = np.concatenate([np.flatnonzero(store.labels == c)[:2] for c in test])
    qry = np.concatenate([np.flatnonzero(store.labels == c)[2:8] for c in test])
    pred = model.predict(store.images[sup], names[np.repeat(np.arange(3), 2)], store.images[qry])
    truth = names[np.repeat(np.arange(3), 6)]
    assert pred.shape == (18,) and set(pred) <= set(names)
    assert (pred == truth).mean() > 0.5  # tiny is learnable: well above chance (1/3)
    with pytest.raises(ConfigError, match="not a trained run folder"):
        fewshot_nsl.load_method(two_methods)
    assert set(fewshot_nsl.__all__) >= {"benchmark", "load_results", "compare", "load_method", "method_options"}


# ----------------------------------------------------------------------------- 4, 5: reports
def _add_quick_copy(results):
    """A copy of the protonet row under the quick profile (as if run with --profile quick)."""
    df = read_leaderboard(results / "leaderboard.csv")
    row = df[df["method"] == "protonet"].iloc[0].to_dict()
    upsert_row(results / "leaderboard.csv", {**row, "profile": "quick"})


def test_report_filters_smoke_rows_latex_and_forget(two_methods, tmp_path, capsys):
    import shutil

    results = tmp_path / "results"
    shutil.copytree(two_methods, results)
    _add_quick_copy(results)
    r = ["--results-dir", str(results)]
    assert cli(capsys, *r, "--report")[0] == 0
    md = (results / "table6.md").read_text()
    assert "profile `quick`" in md and "profile `smoke`" not in md and "2 smoke-profile row(s) left out" in md
    assert cli(capsys, *r, "--report", "--include-smoke")[0] == 0
    assert "profile `smoke`" in (results / "table6.md").read_text()
    assert cli(capsys, *r, "--report", "--profile", "smoke", "--method", "nearest_neighbor")[0] == 0
    md = (results / "table6.md").read_text()
    assert "profile `quick`" not in md and "| nearest_neighbor |" in md and "| protonet" not in md
    code, out, err = cli(capsys, *r, "--report", "--format", "latex", "--include-smoke")
    tex = (results / "table6.tex").read_text()
    assert code == 0 and "\\toprule" in tex and "\\bottomrule" in tex and "nearest\\_neighbor" in tex
    assert cli(capsys, *r, "--format", "latex")[0] == 2  # --format without --report: refused
    # --forget by run id keeps the run folder; by filter with --delete-runs removes it
    board = read_leaderboard(results / "leaderboard.csv")
    nn = board[board["method"] == "nearest_neighbor"]["run_id"].iloc[0]
    code, out, err = cli(capsys, *r, "--forget", nn)
    assert code == 0 and "forgot 1 leaderboard row(s)" in out + err and "kept their 1 run folder" in out + err
    assert (results / "runs" / nn).is_dir() and nn not in set(read_leaderboard(results / "leaderboard.csv")["run_id"])
    code, out, err = cli(capsys, *r, "--forget", "--profile", "smoke", "--delete-runs")
    assert code == 0 and "deleted 1 run folder" in out + err, out + err
    left = read_leaderboard(results / "leaderboard.csv")
    assert list(left["profile"]) == ["quick"]
    code, out, err = cli(capsys, *r, "--forget")
    assert code == 2 and err.count("\n") == 1 and "never removes every row" in err
    code, out, err = cli(capsys, *r, "--forget", "no_such_run")
    assert code == 2 and "nothing removed" in err


def test_plot_colours_one_family_per_method():
    assert method_family("protonet") == method_family("matchingnet") == "metric"
    assert method_family("static_nsn") == method_family("dynamic_nsn") == "NSL"
    assert method_family("maml") != method_family("protonet") and method_family("my_plugin") == "other"


# ----------------------------------------------------------------------------- 6: custom datasets
def _custom(root: Path, classes: int = 6, per_class: int = 20, size: int = 20) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", classes), ("test", classes)):
        for c in range(n):
            d = root / split / f"{split}{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                img = np.clip(rng.normal(40 * c, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def test_dataset_name_resize_line_and_small_split_warning(tmp_path, capsys):
    data = _custom(tmp_path / "clipart")
    args = ["--results-dir", str(tmp_path / "results"), "--dataset", "custom", "--data-root", str(data),
            "--dataset-name", "clipart", "--image-size", "16", "--profile", "smoke", "--method", "nearest_neighbor",
            "--no-progress", "--threads", "1", "--shots", "1", "--queries", "5"]
    code, out, err = cli(capsys, *args, "--n-episodes", "600")
    text = out + err
    assert code == 0, err
    assert text.count("images resized to 16x16 px") == 1
    assert "warning: the test split of clipart has 120 distinct images (6 classes)" in text and "18,000" in text
    board = read_leaderboard(tmp_path / "results" / "leaderboard.csv")
    assert list(board["dataset"]) == ["clipart"]
    assert "clipart (data" in (tmp_path / "results" / "table6.md").read_text()
    code, out, err = cli(capsys, "--dataset", "glyphs", "--dataset-name", "x", "--report")
    assert code == 2 and "--dataset-name" in err


def test_no_small_split_warning_for_a_reasonable_split(tmp_path, capsys):
    data = _custom(tmp_path / "clipart")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = fewshot_nsl.benchmark("nearest_neighbor", shots=1, dataset="custom", data_root=str(data),
                                     dataset_name="clipart", image_size=16, profile="smoke",
                                     eval={"episodes": 10, "queries": 5}, results_dir=str(tmp_path / "r"), threads=1)
    assert rows["dataset"].iloc[0] == "clipart"
    assert not [w for w in caught if "distinct images" in str(w.message)]


# ----------------------------------------------------------------------------- 10: --list --method
def test_list_method_shows_options_defaults_and_docs(capsys):
    code, out, err = cli(capsys, "--list", "--method", "maml")
    text = out + err
    assert code == 0 and "inner_lr" in text and "0.01" in text and "inner loop" in text
    options = {o["name"]: o for o in fewshot_nsl.method_options("maml")}
    assert options["first_order"]["default"] is False and options["first_order"]["doc"]
    assert "backbone" not in options and "image_size" not in options
    code, out, err = cli(capsys, "--list", "--method", "no_such_method")
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1
