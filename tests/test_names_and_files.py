"""Issue 25 items 4-6: names are data (validated at registration, escaped by every renderer),
``--compare`` refuses runs of different experiments, and the suite touches only files it wrote
(temporary-file names, stale-file cleanup, ``--log-file``). Every table shows each row's own
episode and failed-episode counts. Fast: no training except one tiny CLI run."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from fewshot_nsl import registry
from fewshot_nsl.comparisons import compare_runs
from fewshot_nsl.console import Console
from fewshot_nsl.curves import curve_png
from fewshot_nsl.errors import ConfigError, RegistryError
from fewshot_nsl.leaderboard import COLUMNS
from fewshot_nsl.registry import Registry, register_method
from fewshot_nsl.reporting import plot_leaderboard, summary_html, summary_markdown, table6_markdown
from fewshot_nsl.safe_io import atomic_write, check_log_file, remove_stale_tmp
from fewshot_nsl.safe_io import tmp_path as tmp_name_of

REPO = Path(__file__).resolve().parent.parent

BAD_NAMES = ["evil | 99.90 | x", "two\nlines", "../outside", "a/b", "a\\b", "=HYPERLINK(1)", "+1", "-rf", "@sum",
             "$\\undefined$", "`code`", ".hidden", "a..b", "", " lead", "tab\tname", "x" * 65, "naïve", "a b"]


# ----------------------------------------------------------------------------- registration
@pytest.mark.parametrize("name", BAD_NAMES)
def test_unsafe_names_are_refused_at_registration_in_one_line(name):
    reg = Registry("method")
    with pytest.raises(RegistryError) as info:
        reg.register(name)(type("Plugin", (), {}))
    msg = str(info.value)
    assert "\n" not in msg and repr(name) in msg and "letter or digit" in msg
    assert name not in reg


def test_non_string_names_are_refused():
    with pytest.raises(RegistryError, match="method name 5 is not allowed"):
        Registry("method").register(5)  # type: ignore[arg-type]


def test_every_registered_name_follows_the_rule():
    registry.load_plugins([REPO / "tests" / "plugins"])
    names = registry.list_methods() + registry.list_backbones() + registry.list_datasets()
    assert {"protonet", "static_nsn", "cnn4", "cnn9", "glyphs", "miniimagenet", "tiny"} <= set(names)
    assert all(registry.is_valid_name(n) for n in names)
    for good in ("protonet", "l2l_metasgd", "my-method.v2", "proto+aug", "x" * 64, "A1"):
        assert registry.is_valid_name(good), good


def test_an_unknown_name_with_a_newline_is_still_one_line():
    with pytest.raises(RegistryError) as info:
        registry.METHODS.get("proto\nnet")
    assert "\n" not in str(info.value) and "'proto\\nnet'" in str(info.value)


BAD_PLUGIN = '''
import torch
from fewshot_nsl.methods import FewShotMethod
from fewshot_nsl.registry import register_method

@register_method("x/../../../escaped")
class Escaper(FewShotMethod):
    training_stages = ()
    def fit_support(self, x, y):
        self.ways = int(y.max()) + 1
    def forward(self, x):
        return torch.zeros(len(x), self.ways)
'''


def test_a_plugin_named_with_a_path_never_writes_outside_the_results_folder(tmp_path, capsys):
    from fewshot_nsl.cli import main

    plugins = tmp_path / "lab_plugins"
    plugins.mkdir()
    (plugins / "escaper.py").write_text(BAD_PLUGIN)
    results = tmp_path / "work" / "results"
    try:
        code = main(["--results-dir", str(results), "--plugins", str(plugins), "--plugins", str(REPO / "tests" / "plugins"),
                     "--dataset", "tiny", "--method", "x/../../../escaped", "--image-size", "16", "--profile", "smoke",
                     "--n-episodes", "2", "--queries", "2", "--threads", "1", "--no-progress"])
        err = capsys.readouterr().err
        outside = [p for p in (tmp_path / "work").rglob("*") if not p.resolve().is_relative_to(results.resolve())]
        assert not outside
        assert code == 2 and err.count("\n") == 1 and "unknown method 'x/../../../escaped'" in err
        why = registry.PLUGIN_ERRORS[str((plugins / "escaper.py").resolve())]
        assert "'x/../../../escaped' is not allowed" in why and "letter or digit" in why
    finally:
        registry.PLUGIN_ERRORS.pop(str((plugins / "escaper.py").resolve()), None)
        registry.METHODS._entries.pop("x/../../../escaped", None)
        registry.METHODS._sources.pop("x/../../../escaped", None)


# ----------------------------------------------------------------------------- renderers
def _row(method="protonet", backbone="cnn4", shots=5, accuracy=22.4, episodes=600, failed=0, **kw):
    row = {c: None for c in COLUMNS}
    row.update(dataset="tiny", dataset_fingerprint="1a2b3c4d5e6f7a8b", split="test", ways=5, profile="smoke",
               image_size=16, method=method, backbone=backbone, shots=shots, accuracy=accuracy, ci95=0.68,
               ci95_t=0.69, std=8.4, n_seeds=1, episodes=episodes, episodes_failed=failed, synthetic=False,
               episode_hash="feedbeef00112233", seeds="0", params=113_000, wall_time_s=12.0, device="cpu",
               threads=1, run_id=f"run_{shots}", ref_method="protonet", ref_backbone="cnn4")
    row.update(kw)
    return row


def _cells(line: str):
    """The cells of a GFM table row: split on pipes that are not backslash-escaped."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _table_rows(md: str):
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    return _cells(lines[0]), [_cells(ln) for ln in lines[2:]]


EVIL = "evil | 99.90 ± 0.01 (600 ep) |\n| `x` $\\frac{1}$ <b>*bold*</b> [l](http://x)"


def test_table6_cells_cannot_be_shifted_by_a_name():
    df = pd.DataFrame([_row(method=EVIL, accuracy=22.4), _row(method="protonet", accuracy=50.0)])
    md = table6_markdown(df)
    header, rows = _table_rows(md)
    assert len(rows) == 2 and all(len(r) == len(header) for r in rows)
    evil = next(r for r in rows if r[0].startswith("evil"))
    acc = header.index("5-shot")
    assert evil[acc].startswith("22.40 ± 0.68") and "99.90" not in evil[acc]
    # the name renders as itself: escaped, on one line, no live HTML, link or math
    assert "\\|" in evil[0] and "\\\\n" in evil[0] and "\\$" in evil[0] and "\\[" in evil[0] and "\\`" in evil[0]
    assert re.search(r"(?<!\\)<b>", md) is None


def test_summary_markdown_and_html_escape_names():
    df = pd.DataFrame([_row(method=EVIL, backbone="cnn4<script>alert(1)</script>")])
    md = summary_markdown(df)
    header, rows = _table_rows(md)
    assert len(rows) == 1 and len(rows[0]) == len(header)
    assert rows[0][header.index("accuracy ± CI95")].startswith("22.40")
    page = summary_html(df)
    assert "<script>" not in page and "&lt;script&gt;" in page and "<b>" not in page
    assert "evil | 99.90" in page and "\\n" in page  # shown as text, the newline visible


def test_profile_with_a_backtick_cannot_open_a_code_span():
    md = table6_markdown(pd.DataFrame([_row(profile="a`b|c")]))
    title = next(ln for ln in md.splitlines() if ln.startswith("## "))
    assert "a\\`b\\|c" in title


def test_each_table_row_shows_its_own_episode_and_failure_counts():
    df = pd.DataFrame([_row(shots=5, accuracy=65.74, episodes=600), _row(shots=1, accuracy=48.1, episodes=10, failed=3),
                       _row(method="maml", shots=5, accuracy=60.0, episodes=597, failed=3)])
    md = table6_markdown(df)
    header, rows = _table_rows(md)
    proto = next(r for r in rows if r[0] == "protonet")
    maml = next(r for r in rows if r[0] == "maml")
    assert proto[header.index("5-shot")] == "65.74 ± 0.68 (600 ep)"
    assert proto[header.index("1-shot")] == "48.10 ± 0.68 (10 ep, 3 failed)"
    assert maml[header.index("5-shot")] == "60.00 ± 0.68 (597 ep, 3 failed)"
    assert "episodes" not in header  # no single count over rows measured on different counts
    for text in (summary_markdown(df), summary_html(df)):
        assert "48.10 ± 0.68 (3 failed)" in text and "60.00 ± 0.68 (3 failed)" in text
    sheader, srows = _table_rows(summary_markdown(df))
    assert sorted((r[sheader.index("episodes")], r[sheader.index("failed")]) for r in srows) == \
        [("10", "3"), ("597", "3"), ("600", "0")]


def test_a_row_without_failure_count_renders():
    md = summary_markdown(pd.DataFrame([_row(failed=float("nan"), episodes=float("nan"))]))
    assert "22.40 ± 0.68" in md


def test_mathtext_in_names_does_not_break_the_plots(tmp_path):
    png = plot_leaderboard(pd.DataFrame([_row(method="$\\undefinedmacro{$", backbone="x$^$")]), tmp_path / "lb.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    rows = [{"stage": "pretrain", "step": 1, "loss": 1.0, "accuracy": 0.5}]
    assert curve_png(rows, title="tiny_$\\undefinedmacro{$_cnn4_5w5s")[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- --compare
def _fake_run(runs: Path, name: str, accs, **meta) -> Path:
    d = runs / name
    d.mkdir(parents=True)
    # rows as a run writes them (accuracy = 100 * correct / total), and the summary's count and mean they back
    (d / "episodes.csv").write_text("episode,accuracy,correct,total,seconds,status\n"
                                    + "".join(f"{i},{a},{round(a * 10)},1000,0.1,ok\n" for i, a in enumerate(accs)))
    summary = {"dataset": "custom", "method": name, "backbone": "cnn4", "ways": 5, "shots": 5, "split": "test",
               "profile": "quick", "seed": 0, "image_size": 84, "episode_hash": "e" * 64,
               "dataset_fingerprint": "d" * 16, "episodes": len(accs), "accuracy": round(sum(accs) / len(accs), 4)}
    summary.update(meta)
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "identity.json").write_text(json.dumps({"dataset_fingerprint": summary["dataset_fingerprint"],
                                                 "split": summary["split"], "episode_hash": summary["episode_hash"]}))
    return d


@pytest.mark.parametrize("field,a,b", [("dataset_fingerprint", "a" * 16, "b" * 16), ("split", "test", "val"),
                                       ("image_size", 84, 32), ("ways", 5, 10), ("shots", 5, 1)])
def test_compare_refuses_runs_of_different_experiments(tmp_path, field, a, b):
    runs = tmp_path / "runs"
    _fake_run(runs, "A", [100.0] * 20, **{field: a})
    _fake_run(runs, "B", [23.2 + (i % 3) for i in range(20)], **{field: b})
    with pytest.raises(ConfigError) as info:
        compare_runs("A", "B", tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "different experiments" in msg and f"{a} vs {b}" in msg


def test_compare_refuses_a_fingerprint_recorded_only_in_identity_json(tmp_path):
    runs = tmp_path / "runs"
    for name, fp in (("A", "a" * 16), ("B", "b" * 16)):
        d = _fake_run(runs, name, [50.0] * 5, dataset_fingerprint=fp)
        s = json.loads((d / "summary.json").read_text())
        del s["dataset_fingerprint"]  # an older summary: the identity still records it
        (d / "summary.json").write_text(json.dumps(s))
    with pytest.raises(ConfigError, match="dataset content"):
        compare_runs("A", "B", tmp_path)


def test_compare_warns_first_about_another_profile_and_counts(tmp_path):
    runs = tmp_path / "runs"
    _fake_run(runs, "A", [60.0, 80.0] * 10, profile="smoke")
    _fake_run(runs, "B", [40.0, 60.0] * 5, profile="quick")
    lines = compare_runs("A", "B", tmp_path).splitlines()
    assert lines[0].startswith("warning:") and "profile (smoke vs quick)" in lines[0]
    assert any(ln.startswith("warning:") and "only the first 10 are paired" in ln for ln in lines)
    assert any("A - B: +20.00" in ln for ln in lines) and any("(10 ep)" in ln for ln in lines)


def test_compare_of_one_experiment_has_no_warning(tmp_path):
    runs = tmp_path / "runs"
    _fake_run(runs, "A", [60.0, 80.0] * 10)
    _fake_run(runs, "B", [40.0, 60.0] * 10)
    out = compare_runs("A", "B", tmp_path)
    assert "warning" not in out and out.startswith("A: A")


# ----------------------------------------------------------------------------- temporary files
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_cleanup_touches_only_the_suites_own_temporary_files(tmp_path):
    dead = _dead_pid()
    user_files = [tmp_path / f"data.tmp{dead}", tmp_path / f".tmp{dead}-notes", tmp_path / f"leaderboard.csv.tmp{dead}"]
    for f in user_files:
        f.write_text("a user's file")
    user_dir = tmp_path / f"scratch.tmp{dead}"
    (user_dir / "sub").mkdir(parents=True)
    (user_dir / "sub" / "important.txt").write_text("keep me")
    ours_dead = tmp_path / f".fewshot-nsl.tmp-{dead}-123-summary.json"
    ours_live = tmp_path / f".fewshot-nsl.tmp-{os.getppid()}-123-summary.json"
    ours_self = tmp_path / f".fewshot-nsl.tmp-{os.getpid()}-1-episodes.csv"
    folder_like_ours = tmp_path / f".fewshot-nsl.tmp-{dead}-7-folder"
    folder_like_ours.mkdir()
    for f in (ours_dead, ours_live, ours_self):
        f.write_text("half a file")
    assert remove_stale_tmp(tmp_path) == 1
    assert not ours_dead.exists()
    assert all(f.exists() for f in (*user_files, ours_live, ours_self, folder_like_ours))
    assert (user_dir / "sub" / "important.txt").read_text() == "keep me"


def test_temporary_names_carry_prefix_pid_and_thread(tmp_path):
    names = {}

    def record(key):
        names[key] = tmp_name_of(tmp_path / "leaderboard.csv")

    threads = [threading.Thread(target=record, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    record("main")
    assert len(set(names.values())) == 3
    for p in names.values():
        assert p.parent == tmp_path and p.name.startswith(f".fewshot-nsl.tmp-{os.getpid()}-")
        assert p.name.endswith("-leaderboard.csv")
    long = tmp_name_of(tmp_path / ("x" * 255))
    assert len(long.name.encode()) <= 255


def test_atomic_writes_of_one_file_from_many_threads(tmp_path):
    """Threads of one process (``benchmark()`` in a thread pool) writing the same file: each write
    is whole, none fails (the temporary file used to be per process, shared by the threads)."""
    target = tmp_path / "leaderboard.csv"
    barrier = threading.Barrier(6)
    errors = []

    def writer(k: int) -> None:
        def write(f):
            for _ in range(5):
                f.write(f"writer {k}\n")
                time.sleep(0.001)

        try:
            barrier.wait()
            for _ in range(10):
                atomic_write(target, write)
        except Exception as exc:  # noqa: BLE001 (collected and asserted below)
            errors.append(repr(exc))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    lines = target.read_text().splitlines()
    assert len(lines) == 5 and len(set(lines)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["leaderboard.csv"]


# ----------------------------------------------------------------------------- --log-file
@pytest.fixture
def folders(tmp_path):
    results, cache = tmp_path / "results", tmp_path / "cache"
    (results / "runs" / "r1").mkdir(parents=True)
    cache.mkdir()
    (results / "leaderboard.csv").write_text("dataset,method\n")
    return results, cache


@pytest.mark.parametrize("where", ["results/leaderboard.csv", "results/table6.md", "results/runs/r1/episodes.csv",
                                   "results/new.log", "cache/store.log"])
def test_log_file_inside_managed_folders_is_refused(tmp_path, folders, where):
    results, cache = folders
    with pytest.raises(ConfigError) as info:
        check_log_file(tmp_path / where, results, cache)
    assert "\n" not in str(info.value) and "--log-file" in str(info.value) and "inside the" in str(info.value)


def test_log_file_links_into_the_results_folder_are_refused(tmp_path, folders):
    results, cache = folders
    (tmp_path / "sneaky.log").symlink_to(results / "leaderboard.csv")
    with pytest.raises(ConfigError, match="inside the results folder"):
        check_log_file(tmp_path / "sneaky.log", results, cache)
    os.link(results / "leaderboard.csv", tmp_path / "hard.log")
    with pytest.raises(ConfigError, match="hard link"):
        check_log_file(tmp_path / "hard.log", results, cache)


def test_log_file_that_is_not_a_regular_file_is_refused(tmp_path, folders):
    results, cache = folders
    fifo = tmp_path / "pipe.log"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "FIFO"), (Path("/dev/null"), "device"), (tmp_path, "folder")):
        with pytest.raises(ConfigError, match=kind):
            check_log_file(path, results, cache)


def test_log_file_elsewhere_and_inputs(tmp_path, folders):
    results, cache = folders
    assert check_log_file(tmp_path / "logs" / "run.log", results, cache) == tmp_path / "logs" / "run.log"
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match="which the run reads"):
        check_log_file(tmp_path / "data" / "train.csv", results, cache, inputs=[tmp_path / "data"])


def test_console_refuses_the_leaderboard_as_log_file(tmp_path, folders, monkeypatch):
    results, cache = folders
    before = (results / "leaderboard.csv").read_text()
    monkeypatch.chdir(tmp_path)  # the default results folder is ./results
    console = Console(log_file=Path("results/leaderboard.csv"))  # as the CLI builds it today
    with pytest.raises(ConfigError, match="inside the results folder"):
        console.open()
    console.close()
    console = Console(log_file=results / "leaderboard.csv", results_dir=results, cache_dir=cache)
    with pytest.raises(ConfigError, match="inside the results folder"):
        console.open()
    console.close()
    assert (results / "leaderboard.csv").read_text() == before
    other = tmp_path / "elsewhere"
    log = tmp_path / "run.log"
    console = Console(log_file=log, results_dir=other, cache_dir=cache).open()
    console.info("hello")
    console.close()
    assert log.read_text().endswith("hello\n")


def test_log_file_inside_a_results_folder_set_by_a_config_file_is_refused(tmp_path, capsys):
    """The results folder a --config file sets is the suite's too: a --log-file inside it is one error line."""
    from fewshot_nsl.cli import main

    results = tmp_path / "elsewhere"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"results_dir: {results}\nprofile: smoke\n")
    code = main(["--config", str(cfg), "--method", "protonet", "--log-file", str(results / "leaderboard.csv"),
                 "--n-episodes", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "log" in err[0], err
    assert not (results / "runs").exists()
