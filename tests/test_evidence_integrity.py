"""A leaderboard row is only what its runs' per-episode records back.

A finished run records the sha256 of its ``episodes.csv`` in ``summary.json``. A record changed, truncated or
deleted after the run is never used: the same command sets it aside (kept, renamed) and evaluates the episodes
again; the reports mark a row its runs no longer back (``⚠ unverified``, one ``warning:`` line) and clear its
paired columns instead of keeping stale ones; ``--compare`` refuses such a run in one line; ``--rerun`` removes
the row of the run folder it deletes. The paired reference has the row's precision, and a row lists every
seed's ``threads``. The committed reference rows (summaries written before the digest) verify on content.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from fewshot_nsl.cli import main
from fewshot_nsl.comparisons import _pick_reference
from fewshot_nsl.episode_log import EPISODES_DIGEST, evidence_problem
from fewshot_nsl.leaderboard import read_leaderboard, row_evidence_problem

REPO = Path(__file__).resolve().parent.parent
TINY = ["--plugins", str(REPO / "tests" / "plugins"), "--dataset", "tiny", "--image-size", "16", "--profile", "smoke",
        "--queries", "3", "--n-episodes", "6", "--shots", "1", "--no-progress"]


def cli(results: Path, capsys, *args, threads: int = 1):
    before = torch.get_num_threads()
    try:
        code = main(["--results-dir", str(results), "--cache-dir", str(results.parent / "cache"),
                     "--threads", str(threads), *TINY, *args])
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A results folder with a finished protonet and nearest-neighbour row (built once, copied per test)."""
    import shutil

    root = tmp_path_factory.mktemp("evidence")
    results = root / "results"
    for method in ("protonet", "nearest_neighbor"):
        before = torch.get_num_threads()
        try:
            assert main(["--results-dir", str(results), "--cache-dir", str(root / "cache"), "--threads", "1", *TINY,
                         "--method", method]) == 0
        finally:
            torch.set_num_threads(before)

    def copy(dest: Path) -> Path:
        shutil.copytree(results, dest / "results")
        shutil.copytree(root / "cache", dest / "cache", dirs_exist_ok=True)
        return dest / "results"
    return copy


def run_dir(results: Path, method: str) -> Path:
    (d,) = [p for p in (results / "runs").iterdir() if p.name.startswith(f"tiny_{method}_")]
    return d


def row(results: Path, method: str) -> dict:
    df = read_leaderboard(results / "leaderboard.csv")
    return df[df["method"] == method].iloc[0].to_dict()


def edit_episode(d: Path, episode: int, accuracy: str) -> None:
    lines = (d / "episodes.csv").read_text().splitlines(keepends=True)
    fields = lines[episode + 1].split(",")
    lines[episode + 1] = ",".join([fields[0], accuracy] + fields[2:])
    (d / "episodes.csv").write_text("".join(lines))


def test_a_finished_run_records_the_digest_of_its_episodes(finished, tmp_path):
    results = finished(tmp_path)
    d = run_dir(results, "protonet")
    summary = json.loads((d / "summary.json").read_text())
    assert len(summary[EPISODES_DIGEST]) == 64
    assert evidence_problem(d) is None and row_evidence_problem(row(results, "protonet"), results) is None


def test_an_edited_episode_row_is_marked_then_evaluated_again_by_the_same_command(finished, tmp_path, capsys):
    results = finished(tmp_path)
    d = run_dir(results, "protonet")
    original = json.loads((d / "summary.json").read_text())["accuracy"]
    edit_episode(d, 1, "100.000000")
    assert "changed after the run finished" in evidence_problem(d)

    code, out = cli(results, capsys, "--report")
    assert code == 0, out
    assert "warning: leaderboard row protonet" in out and "not backed by its runs" in out
    table = (results / "table6.md").read_text()
    assert "⚠ unverified" in table and "changed after the run finished" in table
    # the partner's paired columns are cleared, not computed on the edited file nor kept from before
    assert pd.isna(row(results, "nearest_neighbor")["diff_vs_ref"])

    code, out = cli(results, capsys, "--method", "protonet")
    assert code == 0, out
    assert f"warning: run {d.name}: its episodes.csv was changed" in out and "evaluated again" in out
    kept = sorted(p.name.split(".rejected-")[0] for p in d.glob("*.rejected-*"))
    assert kept == ["episodes.csv", "summary.json"]  # the edited record is kept aside, never deleted
    assert evidence_problem(d) is None
    assert json.loads((d / "summary.json").read_text())["accuracy"] == original  # the same episodes again
    assert "unverified" not in (results / "table6.md").read_text()
    assert pd.notna(row(results, "nearest_neighbor")["diff_vs_ref"])


def test_a_legacy_summary_with_lost_rows_is_not_complete(finished, tmp_path, capsys):
    """A summary written before the digest is checked on the content: a lost row is a problem too."""
    results = finished(tmp_path)
    d = run_dir(results, "nearest_neighbor")
    summary = json.loads((d / "summary.json").read_text())
    del summary[EPISODES_DIGEST]
    (d / "summary.json").write_text(json.dumps(summary))
    assert evidence_problem(d) is None  # the content backs it
    lines = (d / "episodes.csv").read_text().splitlines(keepends=True)
    (d / "episodes.csv").write_text("".join(lines[:4] + lines[5:]))  # episode 3 lost
    assert "no row for episode(s) [3]" in evidence_problem(d)
    code, out = cli(results, capsys, "--method", "nearest_neighbor")
    assert code == 0, out
    assert "kept aside" in out and evidence_problem(d) is None
    assert json.loads((d / "summary.json").read_text())["accuracy"] == summary["accuracy"]


def test_legacy_content_checks_catch_inconsistent_rows_and_means(finished, tmp_path):
    results = finished(tmp_path)
    d = run_dir(results, "protonet")
    summary = json.loads((d / "summary.json").read_text())
    del summary[EPISODES_DIGEST]
    original = (d / "episodes.csv").read_text()
    edit_episode(d, 0, "99.000000")  # no longer correct / total
    assert "row of episode 0" in evidence_problem(d, summary)
    (d / "episodes.csv").write_text(original)
    summary["accuracy"] += 1.0  # the rows are consistent, their mean is not the summary's
    assert "episodes.csv gives" in evidence_problem(d, summary)


def test_a_hand_edited_leaderboard_accuracy_and_a_gone_run_folder_are_marked(finished, tmp_path, capsys):
    import shutil

    results = finished(tmp_path)
    lb = results / "leaderboard.csv"
    df = pd.read_csv(lb)
    df.loc[df["method"] == "protonet", "accuracy"] = 90.0
    df.to_csv(lb, index=False)
    shutil.rmtree(run_dir(results, "nearest_neighbor"))
    code, out = cli(results, capsys, "--report")
    assert code == 0, out
    assert "its accuracy 90.0 is not the" in out
    assert "its run folder runs/tiny_nearest_neighbor" in out and "is gone" in out
    assert (results / "table6.md").read_text().count("(6 ep) ⚠ unverified") == 2  # both rows, and a note each
    assert pd.isna(row(results, "nearest_neighbor")["diff_vs_ref"])  # no stale paired value


def test_compare_refuses_a_run_whose_record_changed(finished, tmp_path, capsys):
    results = finished(tmp_path)
    a, b = run_dir(results, "nearest_neighbor"), run_dir(results, "protonet")
    code, out = cli(results, capsys, "--compare", a.name, b.name)
    assert code == 0 and "paired t-test" in out, out
    edit_episode(b, 2, "0.000000")
    code, out = cli(results, capsys, "--compare", a.name, b.name)
    assert code == 2 and f"run {b.name}: its episodes.csv was changed" in out, out
    assert "Traceback" not in out


def test_rerun_removes_the_row_of_the_folder_it_deletes(finished, tmp_path, capsys):
    results = finished(tmp_path)
    code, out = cli(results, capsys, "--method", "protonet", "--rerun")
    assert code == 0, out
    assert "and its leaderboard row" in out
    assert row_evidence_problem(row(results, "protonet"), results) is None  # the rerun put it back, backed


def test_the_paired_reference_has_the_rows_precision():
    base = {"dataset": "d", "dataset_fingerprint": "f", "split": "test", "image_size": 16, "ways": 5, "shots": 1,
            "profile": "smoke", "episode_hash": "e", "backbone": "cnn4"}
    df = pd.DataFrame([base | {"method": "nearest_neighbor", "precision": "fp32"},
                       base | {"method": "protonet", "precision": "bf16"},
                       base | {"method": "protonet", "precision": None}])  # a row from before the option: fp32
    assert _pick_reference(df, 0, "protonet") == 2
    assert _pick_reference(df.drop(index=2), 0, "protonet") is None


def test_a_row_lists_every_seeds_threads(finished, tmp_path, capsys):
    results = finished(tmp_path)
    code, out = cli(results, capsys, "--method", "protonet", "--seed", "1", threads=2)
    assert code == 0, out
    r = row(results, "protonet")
    assert r["seeds"] == "0,1" and str(r["threads"]) == "1;2", r


@pytest.mark.parametrize("folder", sorted(p.name for p in (REPO / "results" / "reference").iterdir() if p.is_dir()))
def test_every_committed_reference_row_is_backed_by_its_runs(folder):
    results = REPO / "results" / "reference" / folder
    df = read_leaderboard(results / "leaderboard.csv")
    assert len(df)
    assert {r["method"]: row_evidence_problem(r.to_dict(), results) for _, r in df.iterrows()
            if row_evidence_problem(r.to_dict(), results)} == {}


def test_an_unwritable_results_folder_is_one_error_line(finished, tmp_path, capsys, monkeypatch):
    """A read-only folder or a full disk under ``--report`` / ``--forget``: the system's reason in one line."""
    import errno

    import fewshot_nsl.leaderboard as leaderboard
    import fewshot_nsl.reporting as reporting

    results = finished(tmp_path)

    def refuse(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(reporting, "_write_text", refuse)
    code, out = cli(results, capsys, "--report")
    assert code == 2 and "error: cannot read or write" in out and "Read-only file system" in out, out
    assert "Traceback" not in out and len([ln for ln in out.splitlines() if ln.startswith("error:")]) == 1
    monkeypatch.setattr(leaderboard, "_write_atomic_csv", refuse)
    code, out = cli(results, capsys, "--forget", "--method", "protonet")
    assert code == 2 and "Read-only file system" in out and "Traceback" not in out, out
    assert len(read_leaderboard(results / "leaderboard.csv")) == 2  # nothing was lost


def test_compare_names_the_code_of_two_versions_of_one_method(finished, tmp_path, capsys):
    import shutil

    results = finished(tmp_path)
    a, b = run_dir(results, "nearest_neighbor"), run_dir(results, "protonet")
    code, out = cli(results, capsys, "--compare", a.name, b.name)
    assert code == 0 and ", code " not in out  # two methods: their names tell them apart
    edited = results / "runs" / "protonet_edited"  # the same method after an edit of its code
    shutil.copytree(b, edited)
    summary = json.loads((edited / "summary.json").read_text())
    summary["code_hash"] = "0123456789abcdef"
    (edited / "summary.json").write_text(json.dumps(summary))
    code, out = cli(results, capsys, "--compare", edited.name, b.name)
    code_b = json.loads((b / "summary.json").read_text())["code_hash"]
    assert code == 0 and "code 01234567)" in out and f"code {code_b[:8]})" in out, out
