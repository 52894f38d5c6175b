"""Run identity: every component that determines a result changes the run id, a run folder of
another identity is never resumed or written into, and the leaderboard key keeps experiments apart.

Unit tests check each component of :class:`fewshot_nsl.identity.RunIdentity` (each fails if that
component is dropped from the identity); end-to-end tests replay the ways a wrong row used to be
published with exit status 0 (another --data-root, another --episodes list, an edited plugin).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot_nsl.cli import main
from fewshot_nsl.config import resolve_config
from fewshot_nsl.data.episodes import EpisodeList, episode_list_for_store
from fewshot_nsl.data.store import ImageStore
from fewshot_nsl.errors import DataError
from fewshot_nsl.identity import RunIdentity
from fewshot_nsl.reporting import read_leaderboard
from fewshot_nsl.runner import claim_run_dir, run_id, run_identity
from fewshot_nsl.training import atomic_torch_save, pretrain_cache_path
from fewshot_nsl.runner import conv_spec_of
from fewshot_nsl.registry import get_method_class

REPO = Path(__file__).resolve().parent.parent
PLUGINS = str(REPO / "tests" / "plugins")


def _cfg(tmp_path, **over):
    base = {"method": "protonet", "dataset": "tiny", "image_size": 16, "profile": "smoke", "shots": 2,
            "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
            "eval": {"episodes": 6, "queries": 5}}
    return resolve_config({**base, **over})


def _episodes(store: ImageStore, split: str = "test", seed: int = 0, n: int = 6) -> EpisodeList:
    return episode_list_for_store(store, split, 5, 2, 5, n, seed)


# ----------------------------------------------------------------------------- one test per component
def test_identity_changes_with_the_config(tmp_path, tiny_store):
    eps = _episodes(tiny_store)
    a = run_identity(_cfg(tmp_path), tiny_store, eps)
    b = run_identity(_cfg(tmp_path, episodic={"lr": 0.01}), tiny_store, eps)
    assert a.config_hash != b.config_hash and a.digest() != b.digest()


def test_identity_changes_with_the_dataset_content_not_its_path(tmp_path, tiny_store):
    eps = _episodes(tiny_store)
    images = np.array(tiny_store.images)
    images[-1, 0, 0, 0] ^= 1  # one bit of one image
    other = ImageStore("tiny", images, tiny_store.labels, tiny_store.class_names, tiny_store.class_splits,
                       synthetic=True, source="tests")
    cfg = _cfg(tmp_path)
    a, b = run_identity(cfg, tiny_store, eps), run_identity(cfg, other, eps)
    assert a.dataset_fingerprint != b.dataset_fingerprint and a.digest() != b.digest()
    # the data root is not part of the identity: the same content elsewhere is the same run
    moved = dataclasses.replace(cfg, data_root=str(tmp_path / "elsewhere"))
    assert run_identity(moved, tiny_store, eps) == a


def test_identity_changes_with_the_episode_list(tmp_path, tiny_store):
    cfg = _cfg(tmp_path)
    a = run_identity(cfg, tiny_store, _episodes(tiny_store, seed=0))
    b = run_identity(cfg, tiny_store, _episodes(tiny_store, seed=1))
    assert a.episode_hash != b.episode_hash and a.digest() != b.digest()


def test_identity_and_run_id_name_the_split(tmp_path, tiny_store):
    test = run_identity(_cfg(tmp_path), tiny_store, _episodes(tiny_store, "test"))
    val_cfg = _cfg(tmp_path, eval={"episodes": 6, "queries": 5, "split": "val"})
    val = run_identity(val_cfg, tiny_store, _episodes(tiny_store, "val"))
    assert (test.split, val.split) == ("test", "val") and test.digest() != val.digest()
    assert "_val_" in run_id(val_cfg, val) and "_test_" not in run_id(_cfg(tmp_path), test)
    # the split alone changes the digest (not only through the episode hash)
    assert dataclasses.replace(test, split="val").digest() != test.digest()


def _write_plugin(folder: Path, file: str, name: str, body: str) -> Path:
    """A plugin file registering ``class <body>`` as method ``name``; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / file
    src.write_text("import torch\nfrom fewshot_nsl.registry import register_method\n"
                   "from fewshot_nsl.methods import FewShotMethod\n\n"
                   f"@register_method('{name}')\nclass Plugin(FewShotMethod):\n" + body)
    return src


def test_identity_changes_with_the_method_code(tmp_path, tiny_store):
    from fewshot_nsl.registry import load_plugins

    folder = tmp_path / "code_plugins"
    src = _write_plugin(folder, "edited_method.py", "edited_for_identity",
                        "    SCALE = 1.0\n    def fit_support(self, x, y):\n        pass\n    def forward(self, q):\n        return q\n")
    load_plugins([folder])
    eps = _episodes(tiny_store)
    cfg = _cfg(tmp_path, method="edited_for_identity")
    a = run_identity(cfg, tiny_store, eps)
    src.write_text(src.read_text().replace("SCALE = 1.0", "SCALE = 2.0"))
    # the edited file is not what this process runs until it is re-imported: refused in one line, never a new hash
    # over the old module (issue 25)
    from fewshot_nsl.errors import RegistryError

    with pytest.raises(RegistryError, match="changed on disk since it was imported"):
        run_identity(cfg, tiny_store, eps)
    load_plugins([folder])  # re-imports the changed plugin folder
    b = run_identity(cfg, tiny_store, eps)
    assert a.code_hash != b.code_hash and a.digest() != b.digest()
    # a built-in method's code hash differs from another method's (its own source file counts)
    assert run_identity(_cfg(tmp_path), tiny_store, eps).code_hash != \
        run_identity(_cfg(tmp_path, method="matchingnet"), tiny_store, eps).code_hash


def test_identity_changes_with_the_pretraining_world_size(tmp_path, tiny_store):
    cfg = _cfg(tmp_path, method="nearest_neighbor")
    eps = _episodes(tiny_store)
    single = run_identity(cfg, tiny_store, eps)
    assert single.world_size == 1
    path = pretrain_cache_path(cfg, tiny_store, conv_spec_of(cfg), get_method_class(cfg.method), Path(cfg.cache_dir))
    atomic_torch_save({"module": {}, "train_accuracy": 0.5, "world_size": 2}, path)  # a torchrun pretraining
    multi = run_identity(cfg, tiny_store, eps)
    assert multi.world_size == 2 and multi.digest() != single.digest()


def test_pretraining_cache_key_covers_the_code(tmp_path, tiny_store, monkeypatch):
    import fewshot_nsl.identity as ident

    cfg = _cfg(tmp_path, method="nearest_neighbor")
    cls = get_method_class(cfg.method)
    a = pretrain_cache_path(cfg, tiny_store, conv_spec_of(cfg), cls, tmp_path)
    monkeypatch.setattr(ident, "package_code_hash", lambda: "0" * 16)
    assert pretrain_cache_path(cfg, tiny_store, conv_spec_of(cfg), cls, tmp_path) != a


# ----------------------------------------------------------------------------- run folders
def test_a_run_folder_of_another_identity_is_never_written_into(tmp_path):
    ident = RunIdentity("c" * 16, "d" * 16, "e" * 16, "test", "f" * 16, 1)
    rdir = tmp_path / "run"
    claim_run_dir(rdir, ident)
    claim_run_dir(rdir, ident)  # the same identity: resumed
    other = dataclasses.replace(ident, dataset_fingerprint="0" * 16)
    with pytest.raises(DataError, match="differs in dataset_fingerprint"):
        claim_run_dir(rdir, other)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "episodes.csv").write_text("episode,accuracy\n")
    with pytest.raises(DataError, match="no identity.json"):
        claim_run_dir(legacy, ident)
    assert (legacy / "episodes.csv").read_text() == "episode,accuracy\n"


# ----------------------------------------------------------------------------- end to end
def _write_custom(root: Path, distinct: bool, seed: int = 0) -> Path:
    """A ``custom`` dataset (images/ + train.csv/test.csv): 8 train and 5 test classes of 12 images.

    ``distinct``: each class has its own colour (easy); else every image is the same grey (chance).
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    for split, n_classes in (("train", 8), ("test", 5)):
        rows = ["filename,label"]
        for c in range(n_classes):
            colour = rng.uniform(30, 225, 3) if distinct else np.full(3, 128.0)
            for i in range(12):
                noise = rng.normal(0, 12 if distinct else 0, (16, 16, 3))
                img = np.clip(colour + noise, 0, 255).astype(np.uint8)
                name = f"{split}{c:02d}_{i:02d}.png"
                Image.fromarray(img).save(root / "images" / name)
                rows.append(f"{name},{split}_class{c}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def _cli(tmp_path, capsys, *args):
    threads = torch.get_num_threads()
    try:
        code = main(["--results-dir", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache"),
                     "--threads", "1", "--image-size", "16", "--profile", "smoke", "--n-episodes", "20",
                     "--queries", "5", "--shots", "2", "--no-progress", *args])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_another_data_root_is_another_run_and_another_row(tmp_path, capsys):
    easy = _write_custom(tmp_path / "easy", distinct=True)
    blank = _write_custom(tmp_path / "blank", distinct=False)
    args = ["--method", "nearest_neighbor", "--dataset", "custom"]
    code, out, err = _cli(tmp_path, capsys, *args, "--data-root", str(easy))
    assert code == 0, err
    code, out, err = _cli(tmp_path, capsys, *args, "--data-root", str(blank))
    assert code == 0, err
    assert "1 cell(s) run" in out and "nothing to do" not in out
    board = read_leaderboard(tmp_path / "results" / "leaderboard.csv")
    assert len(board) == 2 and board["dataset_fingerprint"].nunique() == 2 and board["run_id"].nunique() == 2
    acc = dict(zip(board["run_id"], board["accuracy"]))
    blank_row = board[board["accuracy"] == min(acc.values())].iloc[0]
    assert blank_row["accuracy"] < 40 < board["accuracy"].max()  # the blank data is at chance, not reused
    # and the same command again reuses each, without training
    code, out, _ = _cli(tmp_path, capsys, *args, "--data-root", str(blank))
    assert code == 0 and "nothing to do" in out


def test_another_episode_list_is_another_run(tmp_path, capsys, tiny_store):
    lst = episode_list_for_store(tiny_store, "test", 5, 2, 5, 20, 7)
    path = tmp_path / "other_episodes.json"
    lst.save(path)
    args = ["--plugins", PLUGINS, "--dataset", "tiny", "--method", "nearest_neighbor"]
    assert _cli(tmp_path, capsys, *args)[0] == 0
    code, out, err = _cli(tmp_path, capsys, *args, "--episodes", str(path))
    assert code == 0, err
    board = read_leaderboard(tmp_path / "results" / "leaderboard.csv")
    assert len(board) == 2 and board["episode_hash"].nunique() == 2 and board["run_id"].nunique() == 2
    runs = sorted((tmp_path / "results" / "runs").iterdir())
    assert len(runs) == 2
    assert {json.loads((r / "identity.json").read_text())["episode_hash"] for r in runs} == set(board["episode_hash"])


def test_an_edited_plugin_is_rerun_and_rerun_recomputes(tmp_path, capsys):
    folder = tmp_path / "myplugins"
    src = _write_plugin(folder, "scaled_proto.py", "scaled_proto_e2e",
        "    training_stages = ()\n"
        "    SCALE = 1.0\n"
        "    def fit_support(self, x, y):\n"
        "        f = self.backbone(x)\n"
        "        self.means = torch.stack([f[y == k].mean(0) for k in range(int(y.max()) + 1)])\n"
        "    def forward(self, q):\n"
        "        return -self.SCALE * torch.cdist(self.backbone(q), self.means)\n")
    args = ["--plugins", PLUGINS, "--plugins", str(folder), "--dataset", "tiny", "--method", "scaled_proto_e2e"]
    assert _cli(tmp_path, capsys, *args)[0] == 0
    code, out, _ = _cli(tmp_path, capsys, *args)
    assert code == 0 and "nothing to do" in out  # unchanged code: reused
    src.write_text(src.read_text().replace("SCALE = 1.0", "SCALE = 2.0"))
    code, out, err = _cli(tmp_path, capsys, *args)
    assert code == 0, err
    assert "nothing to do" not in out
    runs = sorted((tmp_path / "results" / "runs").iterdir())
    assert len(runs) == 2 and len({json.loads((r / "identity.json").read_text())["code_hash"] for r in runs}) == 2
    board = read_leaderboard(tmp_path / "results" / "leaderboard.csv")
    assert len(board) == 1  # the same experiment with new code replaces the row
    # --rerun recomputes the cell deliberately: its run folder is made anew
    before = (Path(tmp_path / "results" / "runs" / board.iloc[0]["run_id"]) / "summary.json").stat().st_mtime_ns
    code, out, err = _cli(tmp_path, capsys, *args, "--rerun")
    assert code == 0 and "rerun: removed" in out and "nothing to do" not in out
    after = (Path(tmp_path / "results" / "runs" / board.iloc[0]["run_id"]) / "summary.json").stat().st_mtime_ns
    assert after != before


def test_a_val_split_run_does_not_replace_the_test_row(tmp_path, capsys):
    args = ["--plugins", PLUGINS, "--dataset", "tiny", "--method", "nearest_neighbor"]
    assert _cli(tmp_path, capsys, *args)[0] == 0
    cfg = tmp_path / "val.yaml"
    cfg.write_text("eval: {split: val}\n")
    code, out, err = _cli(tmp_path, capsys, *args, "--config", str(cfg))
    assert code == 0, err
    assert "(val split)" in out
    board = read_leaderboard(tmp_path / "results" / "leaderboard.csv")
    assert sorted(board["split"]) == ["test", "val"]
    table = (tmp_path / "results" / "table6.md").read_text()
    assert "test split" in table and "val split" in table


def test_paper_value_only_beside_comparable_rows(tmp_path, capsys):
    from fewshot_nsl.reporting import paper_comparable

    assert paper_comparable("miniimagenet", "paper", 84, "test") == (True, "")
    for args in (("glyphs", "paper", 84, "test"), ("miniimagenet", "quick", 84, "test"),
                 ("miniimagenet", "paper", 32, "test"), ("miniimagenet", "paper", 84, "val")):
        assert not paper_comparable(*args)[0]
    code, out, err = _cli(tmp_path, capsys, "--plugins", PLUGINS, "--dataset", "tiny", "--method", "protonet",
                          "--shots", "5")
    assert code == 0, err
    # the console line says why the paper's value is only for orientation
    assert "paper (Mini-ImageNet, for orientation only: dataset tiny, not Mini-ImageNet; profile smoke, not paper" in out
    assert ": 68.20 +- 0.66" in out
    row = read_leaderboard(tmp_path / "results" / "leaderboard.csv").iloc[0]
    assert float(row["paper_value"]) == 68.20 and str(row["paper_comparable"]) in ("False", "false")
    table = (tmp_path / "results" / "table6.md").read_text()
    assert "paper (5-shot, for orientation)" in table and "| paper (5-shot) |" not in table


def test_stale_temporary_files_are_gone_after_a_successful_run(tmp_path, capsys):
    """Temporary files that a killed process left (``.fewshot-nsl.tmp-<dead pid>-<tid>-*``) are removed by the
    next successful run; those of live processes, and files a user named like temporaries, are kept."""
    import os
    import subprocess
    import sys

    from fewshot_nsl.safe_io import TMP_PREFIX

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    args = ["--plugins", PLUGINS, "--dataset", "tiny", "--method", "nearest_neighbor"]
    assert _cli(tmp_path, capsys, *args)[0] == 0
    results = tmp_path / "results"
    (run,) = (results / "runs").iterdir()
    stale = [run / f"{TMP_PREFIX}{dead.pid}-1-summary.json", results / f"{TMP_PREFIX}{dead.pid}-1-leaderboard.csv"]
    live = run / f"{TMP_PREFIX}{os.getppid()}-1-episodes.csv"
    users = [run / f"summary.json.tmp{dead.pid}", results / f"notes.tmp{dead.pid}"]  # not the suite's: kept
    for f in (*stale, live, *users):
        f.write_text("half a file")
    (run / "summary.json").unlink()  # the next run has work to do: it finishes the run again
    assert _cli(tmp_path, capsys, *args)[0] == 0
    assert not any(f.exists() for f in stale) and live.exists() and all(f.exists() for f in users)
