"""The leaderboard CSV: its key and columns, the paper's values, reading (checked), upserting
under the lock, and the row of a cell aggregated from its seeds' runs.

The leaderboard has one row per experiment: :data:`KEY` = dataset name and content fingerprint,
split, episode list, image size, method, backbone, ways, shots and profile (two rows that differ in
any of these are different experiments); a new result for the same key replaces the old row
(a re-run with other code or settings of the same experiment). Updates take an exclusive file lock
and replace the file atomically (temp file, fsync, rename), so concurrent runs never corrupt it.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import yaml

from .comparisons import PAIRED, add_paired_columns, key_text
from .config import CONFIG_DIR
from .episode_log import episode_accuracies
from .errors import ConfigError
from .safe_io import atomic_write, locked, remove_stale_tmp
from .stats import summarize

KEY = ["dataset", "dataset_fingerprint", "split", "episode_hash", "image_size", "method", "backbone", "ways", "shots",
       "profile"]
#: The key of leaderboards written before the split and identity columns existed (read, upgraded).
LEGACY_KEY = ["dataset", "method", "backbone", "ways", "shots", "profile"]
#: Rows of one rendered table: the same data, split, ways, profile and image size.
GROUP = ["dataset", "dataset_fingerprint", "split", "ways", "profile", "image_size"]
COLUMNS = LEGACY_KEY + ["split"] + [
    "accuracy", "ci95", "ci95_t", "std", "seed_std", "n_seeds", "episodes", "episodes_failed",
    *PAIRED, "paper_value", "paper_ci", "paper_comparable",
    "image_size", "synthetic", "episode_list", "episode_hash", "dataset_fingerprint", "config_hash", "code_hash",
    "seeds", "params", "train_time_s", "eval_time_s", "wall_time_s", "peak_memory_mb", "device", "device_name",
    "threads", "executor", "pretrain_world_size", "resumed", "torch_version", "python_version",
    "version", "git_commit", "git_dirty", "run_id", "finished_at",
]
#: Columns read as text (hex hashes such as ``12e4...`` would otherwise parse as numbers).
TEXT_COLUMNS = ["episode_hash", "dataset_fingerprint", "config_hash", "code_hash", "seeds", "version", "git_commit", "run_id",
                "ref_method", "ref_backbone", "episode_list", "profile", "method", "backbone", "dataset", "split"]
#: Columns a leaderboard of this or an earlier version may have; any other header is refused.
KNOWN_COLUMNS = set(COLUMNS) | {"version"}


# ----------------------------------------------------------------------------- paper values
def _table6() -> Dict[str, Any]:
    return yaml.safe_load((CONFIG_DIR / "table6.yaml").read_text())


def paper_rows() -> List[Dict[str, Any]]:
    """Grid rows of the paper's Table 6 (method, backbone, shots, paper value or None)."""
    return _table6()["rows"]


def paper_only_rows() -> List[Dict[str, Any]]:
    """Table-6 rows this suite does not reproduce (other backbones), for orientation."""
    return _table6().get("paper_only", []) or []


def paper_comparable(dataset: str, profile: str, image_size: Any, split: str = "test") -> Tuple[bool, str]:
    """Whether a row can be set beside the paper's value: Mini-ImageNet, the ``paper`` profile,
    84x84 images, the test split. Returns ``(comparable, why not)``."""
    why = []
    if str(dataset) != "miniimagenet":
        why.append(f"dataset {dataset}, not Mini-ImageNet")
    if str(profile) != "paper":
        why.append(f"profile {profile}, not paper")
    try:
        if int(float(image_size)) != 84:
            why.append(f"{int(float(image_size))} px, not 84")
    except (TypeError, ValueError):
        why.append("image size unknown")
    if str(split) != "test":
        why.append(f"{split} split, not test")
    return (not why, "; ".join(why))


def paper_value(method: str, backbone: str, ways: int, shots: int) -> tuple:
    """``(mean, ci)`` the paper reports for this cell (Mini-ImageNet), or ``(None, None)``."""
    if ways != 5:
        return None, None
    for r in paper_rows():
        if r["method"] == method and r["backbone"] == backbone and r["shots"] == shots:
            return r.get("paper"), r.get("paper_ci")
    return None, None


def check_leaderboard(path: Path) -> None:
    """Refuse a ``leaderboard.csv`` this suite did not write, before anything is run or rendered.

    Raises:
        ConfigError: one line naming the file: not a regular file, binary or not UTF-8, a header
            with unknown columns or without the key columns, or a torn/ragged row.
    """
    path = Path(path)
    if not path.exists():
        return
    fix = "move it away or pass another --results-dir (results are never written over a file the suite cannot read)"
    if not path.is_file():
        raise ConfigError(f"{path} is not a regular file; {fix}")
    data = path.read_bytes()
    if not data:
        return
    if b"\0" in data:
        raise ConfigError(f"{path} is binary, not a leaderboard written by fewshot-nsl; {fix}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text, not a leaderboard written by fewshot-nsl; {fix}") from None
    if not text.endswith("\n"):
        raise ConfigError(f"{path} ends in a torn row (no final newline: an interrupted write by another tool?); {fix}")
    rows = list(csv.reader(text.splitlines()))
    header = rows[0] if rows else []
    unknown = [c for c in header if c not in KNOWN_COLUMNS]
    missing = [c for c in LEGACY_KEY if c not in header]
    if unknown or missing or len(set(header)) != len(header):
        what = f"unknown column(s) {', '.join(unknown[:5])}" if unknown else (
            f"no {', '.join(missing)} column(s)" if missing else "repeated columns")
        raise ConfigError(f"{path} is not a leaderboard written by fewshot-nsl ({what}); {fix}")
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ConfigError(f"{path} line {lineno} has {len(row)} fields, the header {len(header)}; {fix}")


def read_leaderboard(path: Path) -> pd.DataFrame:
    """The leaderboard as a frame (checked by :func:`check_leaderboard`; a leaderboard of an
    earlier version, without the split/identity columns, is upgraded: its rows are on ``test``)."""
    path = Path(path)
    check_leaderboard(path)
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=COLUMNS)
    header = pd.read_csv(path, nrows=0).columns
    df = pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS if c in header}, keep_default_na=True)
    if "split" not in df.columns:
        df["split"] = "test"
    for c in KEY:
        if c not in df.columns:
            df[c] = None
    return df


def _write_atomic_csv(df: pd.DataFrame, path: Path) -> None:
    remove_stale_tmp(path.parent)  # under the leaderboard lock: left by killed writers
    atomic_write(path, lambda f: df.to_csv(f, index=False))


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in COLUMNS if c in df.columns] + [c for c in df.columns if c not in COLUMNS]
    return df[cols].sort_values(KEY, kind="stable").reset_index(drop=True)


def upsert_row(path: Path, row: Dict[str, Any], reference: Optional[str] = None) -> pd.DataFrame:
    """Insert or replace the row with the same key and refresh the paired columns; returns the
    new leaderboard. ``reference`` None keeps the leaderboard's current reference method."""
    path = Path(path)
    with locked(path):
        df = read_leaderboard(path)
        if len(df):
            same = pd.Series(True, index=df.index)
            for k in KEY:
                same &= df[k].map(key_text) == key_text(row.get(k))
            df = df[~same]
        new = pd.DataFrame([{c: row.get(c) for c in COLUMNS} | {k: v for k, v in row.items() if k not in COLUMNS}])
        new = new.astype({c: object for c in new.columns})
        df = new if df.empty else pd.concat([df.astype(object), new], ignore_index=True)
        df = add_paired_columns(df, path.parent, reference)
        df = _ordered(df)
        _write_atomic_csv(df, path)
    return df


def refresh_paired(path: Path, reference: Optional[str] = None) -> pd.DataFrame:
    """Recompute the paired columns of the whole leaderboard (e.g. for another reference)."""
    path = Path(path)
    with locked(path):
        df = read_leaderboard(path)
        if len(df):
            df = _ordered(add_paired_columns(df.astype(object), path.parent, reference))
            _write_atomic_csv(df, path)
    return df

# ----------------------------------------------------------------------------- rows from runs
#: Per-run fields that are the same for every seed of a cell (taken from the first).
_SHARED = ("dataset", "method", "backbone", "ways", "shots", "split", "profile", "paper_value", "paper_ci", "paper_comparable", "image_size",
           "synthetic", "episode_list", "episode_hash", "dataset_fingerprint", "config_hash", "code_hash", "params", "device",
           "device_name", "threads", "executor", "pretrain_world_size", "torch_version", "python_version")


def aggregate(summaries: Sequence[Dict[str, Any]], results_dir: Path) -> Dict[str, Any]:
    """The leaderboard row of a cell from the summaries of its seeds.

    ``accuracy`` is the mean of the per-seed means; ``ci95``/``ci95_t``/``std`` are the episode
    statistics of the per-episode accuracies averaged over seeds (one value per test episode, so
    ``n`` is the number of episodes, and with one seed they are that seed's statistics);
    ``seed_std`` is the sample standard deviation of the per-seed means (empty for one seed).
    Times add up over seeds, peak memory is the maximum.
    """
    if not summaries:
        raise ValueError("aggregate needs at least one run summary")
    summaries = sorted(summaries, key=lambda s: int(s["seed"]))
    n = int(summaries[0]["episodes"]) + int(summaries[0]["episodes_failed"])
    mat = np.stack([episode_accuracies(Path(results_dir) / "runs" / s["run_id"], n) for s in summaries])
    per_episode = mat.mean(axis=0)  # NaN where any seed failed the episode
    ep = summarize(per_episode)
    seed_means = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in mat])
    row: Dict[str, Any] = {k: summaries[0].get(k) for k in _SHARED}

    def total(key: str) -> Optional[float]:
        vals = [s.get(key) for s in summaries]
        return None if any(v is None for v in vals) else round(float(sum(vals)), 2)

    row.update({
        "accuracy": round(float(np.nanmean(seed_means)), 4),
        "ci95": round(ep.ci95, 4), "ci95_t": round(ep.ci95_t, 4), "std": round(ep.std, 4),
        "seed_std": round(float(np.std(seed_means, ddof=1)), 4) if len(summaries) > 1 else None,
        "n_seeds": len(summaries), "episodes": ep.n,
        "episodes_failed": int(sum(int(s["episodes_failed"]) for s in summaries)),
        "seeds": ",".join(str(s["seed"]) for s in summaries),
        "train_time_s": total("train_time_s"), "eval_time_s": total("eval_time_s"), "wall_time_s": total("wall_time_s"),
        "peak_memory_mb": max((s["peak_memory_mb"] for s in summaries if s.get("peak_memory_mb") is not None), default=None),
        "resumed": any(bool(s.get("resumed")) for s in summaries),
        # package version of every seed's run; the git commit only for runs made from a checkout
        "version": ";".join(dict.fromkeys(str(s.get("version") or "unknown") for s in summaries)),
        "git_commit": ";".join(dict.fromkeys(str(s["git_commit"]) for s in summaries if s.get("git_commit"))) or None,
        "git_dirty": any(bool(s.get("git_dirty")) for s in summaries) if any(s.get("git_commit") for s in summaries) else None,
        "run_id": ";".join(s["run_id"] for s in summaries),
        "finished_at": max(str(s["finished_at"]) for s in summaries),
    })
    if len({s.get("executor") for s in summaries}) > 1:
        row["executor"] = "mixed"
    return row
