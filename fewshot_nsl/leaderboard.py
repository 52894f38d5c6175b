"""The leaderboard CSV: its key and columns, the paper's values, reading (checked), upserting
under the lock, and the row of a cell aggregated from its seeds' runs.

The leaderboard has one row per experiment: :data:`KEY` = dataset name and content fingerprint,
split, episode list, image size, method, backbone, ways, shots and profile (two rows that differ in
any of these are different experiments). A new result for the same key replaces the old row (a
re-run with other code or settings of the same experiment) unless it has less evidence: a row
measured on fewer episodes *or* on fewer training seeds never replaces one measured on more
(:func:`has_less_evidence`; episodes and seeds measure different sources of variance, so neither
makes up for the other), except when asked (``replace=True``, ``--replace-row``). Updates take an
exclusive file lock and replace the file atomically (temp file, fsync, rename), so concurrent runs
never corrupt it.

A row aggregates every finished seed of its identity (:func:`cell_summaries`): the seeds run now
and those already in ``<results_dir>/runs/``.

Text cells that a spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``, ``@``, a tab
or a carriage return) are written with a leading ``'`` (OWASP's CSV-injection escape), and so is a
cell that already starts with quotes followed by one of those, so that :func:`read_leaderboard`
gives back the original text exactly (:func:`escape_cell` / :func:`unescape_cell`). Numbers are
never escaped.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from .comparisons import PAIRED, add_paired_columns, key_text
from .config import CONFIG_DIR
from .episode_log import evidence_problem, verified_accuracies
from .errors import ConfigError
from .safe_io import atomic_write, locked, remove_stale_tmp
from .stats import summarize

KEY = ["dataset", "dataset_fingerprint", "split", "episode_hash", "image_size", "method", "backbone", "ways", "shots",
       "profile", "precision"]
#: The key of leaderboards written before the split and identity columns existed (read, upgraded).
LEGACY_KEY = ["dataset", "method", "backbone", "ways", "shots", "profile"]
#: Rows of one rendered table: the same data, split, ways, profile and image size.
GROUP = ["dataset", "dataset_fingerprint", "split", "ways", "profile", "image_size", "precision"]
COLUMNS = LEGACY_KEY + ["split"] + [
    "accuracy", "ci95", "ci95_t", "std", "seed_std", "n_seeds", "episodes", "episodes_failed",
    *PAIRED, "paper_value", "paper_ci", "paper_comparable",
    "image_size", "synthetic", "episode_list", "episode_hash", "dataset_fingerprint", "config_hash", "code_hash",
    "seeds", "params", "train_time_s", "eval_time_s", "wall_time_s", "peak_memory_mb", "device", "device_name",
    "threads", "executor", "pretrain_world_size", "resumed", "precision", "fast_mode", "transductive", "torch_version",
    "python_version",
    "version", "git_commit", "git_dirty", "run_id", "finished_at",
]
#: Columns read as text (hex hashes such as ``12e4...`` would otherwise parse as numbers).
TEXT_COLUMNS = ["episode_hash", "dataset_fingerprint", "config_hash", "code_hash", "seeds", "version", "git_commit", "run_id",
                "ref_method", "ref_backbone", "episode_list", "profile", "method", "backbone", "dataset", "split",
                "precision", "fast_mode"]
#: Columns a leaderboard of this or an earlier version may have; any other header is refused.
KNOWN_COLUMNS = set(COLUMNS) | {"version"}


# ----------------------------------------------------------------------------- paper values
def _table6() -> Dict[str, Any]:
    from .config import parse_yaml

    return parse_yaml((CONFIG_DIR / "table6.yaml").read_text())  # the one config loader (floats like 1e-4)


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
    rows = list(csv.reader(io.StringIO(text, newline="")))  # a quoted cell may hold a line break
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
    # only an empty cell is missing: a method or dataset named NA, NULL, nan or None is a name, not a gap
    df = pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS if c in header}, keep_default_na=False, na_values=[""])
    for c in df.columns:
        if not pd.api.types.is_numeric_dtype(df[c]):
            df[c] = df[c].map(unescape_cell)
    if "split" not in df.columns:
        df["split"] = "test"
    if "precision" not in df.columns:  # rows written before the precision option ran in fp32
        df["precision"] = "fp32"
    for c in KEY:
        if c not in df.columns:
            df[c] = None
    return df


#: A text cell a spreadsheet would evaluate: it starts with one of ``= + - @``, tab or CR (after any
#: quotes, so that a cell already starting with ``'`` is escaped too and reads back unchanged).
_FORMULA = re.compile(r"'*[=+\-@\t\r]")
_ESCAPED = re.compile(r"'+[=+\-@\t\r]")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


def escape_cell(value: Any) -> Any:
    """A CSV cell safe to open in a spreadsheet: text that starts like a formula gets a leading
    ``'``; numbers (also negative ones, as text or not) and other values are returned unchanged.
    :func:`unescape_cell` inverts it."""
    if isinstance(value, str) and _FORMULA.match(value) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def unescape_cell(value: Any) -> Any:
    """The text :func:`escape_cell` was given (its inverse on everything it returns)."""
    if isinstance(value, str) and _ESCAPED.match(value):
        return value[1:]
    return value


def _write_atomic_csv(df: pd.DataFrame, path: Path) -> None:
    remove_stale_tmp(path.parent)  # under the leaderboard lock: left by killed writers
    out = df.copy()
    cr = False
    for c in out.columns:
        if not pd.api.types.is_numeric_dtype(out[c]):
            out[c] = out[c].map(escape_cell)
            cr = cr or bool(out[c].map(lambda v: isinstance(v, str) and "\r" in v).any())
    # Python's csv writer leaves a bare CR unquoted (a line break to every reader): quote every cell then
    quoting = csv.QUOTE_ALL if cr else csv.QUOTE_MINIMAL
    atomic_write(path, lambda f: out.to_csv(f, index=False, quoting=quoting))


def _ordered(df: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in COLUMNS if c in df.columns] + [c for c in df.columns if c not in COLUMNS]
    return df[cols].sort_values(KEY, kind="stable").reset_index(drop=True)


def evidence(row: Dict[str, Any]) -> Tuple[int, int]:
    """``(episodes, seeds)`` a leaderboard row was measured on (a missing count reads as 0 episodes,
    1 seed: rows written by hand or by older versions)."""
    def count(v: Any) -> Optional[int]:
        try:
            f = float(v)
        except (TypeError, ValueError):
            return None
        return int(f) if math.isfinite(f) else None

    episodes = count(row.get("episodes")) or 0
    seeds = count(row.get("n_seeds"))
    if seeds is None:
        text = key_text(row.get("seeds"))
        seeds = len([s for s in text.split(",") if s.strip()]) or 1
    return episodes, seeds


def has_less_evidence(new: Dict[str, Any], old: Dict[str, Any]) -> bool:
    """Whether ``new`` was measured on fewer episodes or on fewer training seeds than ``old``.

    The two are not traded against each other: episodes measure the spread over test episodes,
    seeds the spread over training runs (on glyphs the seed spread is several times the episode
    CI), so a row with more seeds but fewer episodes (or the reverse) still loses evidence.
    Equal evidence is not less: a re-run on as much evidence replaces the row.
    """
    (ne, ns), (oe, os_) = evidence(new), evidence(old)
    return ne < oe or ns < os_


def _measured(row: Dict[str, Any]) -> str:
    episodes, seeds = evidence(row)
    return f"{episodes} episodes x {seeds} seed{'s' if seeds != 1 else ''}"


def kept_row_line(old: Dict[str, Any], new: Dict[str, Any], results_dir: Path,
                  replace: str = "--replace-row (benchmark(..., replace_row=True))") -> str:
    """The console line saying that ``old`` stays on the leaderboard instead of ``new``; ``replace``: how to
    replace it (the CLI flag, or the API argument)."""
    runs = [r for r in key_text(new.get("run_id")).split(";") if r]
    where = Path(results_dir) / "runs"
    at = f"its run is {where / runs[0]}" if len(runs) == 1 else f"its runs are in {where}: {', '.join(runs)}"
    what = (f"{old.get('method')} {old.get('backbone')} {key_text(old.get('ways'))}-way "
            f"{key_text(old.get('shots'))}-shot on {old.get('dataset')}")
    return (f"leaderboard: kept the row of {what} measured on {_measured(old)}; this result has less evidence "
            f"({_measured(new)}; {at}); pass {replace} to replace the row")


def upsert_row(path: Path, row: Dict[str, Any], reference: Optional[str] = None, replace: bool = False,
               log: Optional[Callable[[str], None]] = None) -> pd.DataFrame:
    """Insert or replace the row with the same key and refresh the paired columns; returns the
    leaderboard (the new row is in it unless the old one was kept).

    Args:
        reference: reference method of the paired columns; None keeps the leaderboard's current one.
        replace: replace the row with the same key even when the new one has less evidence.
        log: where to say that the old row was kept (one line, :func:`kept_row_line`).
    """
    path = Path(path)
    with locked(path):
        df = read_leaderboard(path)
        if len(df):
            same = pd.Series(True, index=df.index)
            for k in KEY:
                same &= df[k].map(key_text) == key_text(row.get(k))
            if not replace and same.any():
                old = df[same].iloc[0].to_dict()
                if has_less_evidence(row, old):
                    if log is not None:
                        log(kept_row_line(old, row, path.parent))
                    return df
            df = df[~same]
        new = pd.DataFrame([{c: row.get(c) for c in COLUMNS} | {k: v for k, v in row.items() if k not in COLUMNS}])
        new = new.astype({c: object for c in new.columns})
        df = new if df.empty else pd.concat([df.astype(object), new], ignore_index=True)
        df = add_paired_columns(df, path.parent, reference)
        df = _ordered(df)
        _write_atomic_csv(df, path)
    return df


def board_row(board: Optional[pd.DataFrame], row: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The leaderboard row with ``row``'s :data:`KEY` (a run summary or a leaderboard row), None if there is none."""
    if board is None or board.empty:
        return None
    same = pd.Series(True, index=board.index)
    for k in KEY:
        same &= board[k].map(key_text) == key_text(row.get(k))
    hit = board[same]
    return None if hit.empty else hit.iloc[0].to_dict()


def refresh_paired(path: Path, reference: Optional[str] = None) -> pd.DataFrame:
    """Recompute the paired columns of the whole leaderboard (e.g. for another reference)."""
    path = Path(path)
    with locked(path):
        df = read_leaderboard(path)
        if len(df):
            df = _ordered(add_paired_columns(df.astype(object), path.parent, reference))
            _write_atomic_csv(df, path)
    return df

def select_rows(df: pd.DataFrame, where: Optional[Dict[str, Sequence[Any]]] = None,
                run_ids: Optional[Sequence[str]] = None) -> pd.Series:
    """A boolean mask of the rows of ``df`` that match every filter of ``where`` (column -> accepted
    values, compared as text: ``{"method": ["protonet"], "shots": [5]}``) and, when ``run_ids`` is
    given, name one of those runs in their ``run_id`` cell (``;``-separated for several seeds)."""
    mask = pd.Series(True, index=df.index)
    for column, values in (where or {}).items():
        if values is None:
            continue
        wanted = {key_text(v) for v in values}
        cells = df[column].map(key_text) if column in df.columns else pd.Series("", index=df.index)
        mask &= cells.isin(wanted)
    if run_ids is not None:
        ids = {str(r) for r in run_ids}
        cells = df["run_id"].map(key_text) if "run_id" in df.columns else pd.Series("", index=df.index)
        mask &= cells.map(lambda c: bool(ids & set(c.split(";"))))
    return mask


def forget_rows(path: Path, where: Optional[Dict[str, Sequence[Any]]] = None,
                run_ids: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Remove the leaderboard rows that match (:func:`select_rows`) under the lock, refresh the
    paired columns of the rows left (a removed reference row clears its partners' columns), and
    return the removed rows. Run folders are not touched.

    Raises:
        ConfigError: neither a filter nor run ids (that would remove every row).
    """
    if not run_ids and not any(v is not None for v in (where or {}).values()):
        raise ConfigError("--forget needs run ids (--forget RUN_ID[,RUN_ID]) or a filter (--method, --dataset, "
                          "--profile, --backbone, --shots); it never removes every row")
    path = Path(path)
    with locked(path):
        df = read_leaderboard(path)
        if df.empty:
            return df
        mask = select_rows(df, where, run_ids)
        removed = df[mask]
        if len(removed):
            kept = df[~mask]
            if len(kept):
                kept = _ordered(add_paired_columns(kept.astype(object), path.parent))
            _write_atomic_csv(kept if len(kept) else pd.DataFrame(columns=list(df.columns)), path)
    return removed


# ----------------------------------------------------------------------------- rows from runs
#: Per-run fields that are the same for every seed of a cell (taken from the first).
_SHARED = ("dataset", "method", "backbone", "ways", "shots", "split", "profile", "paper_value", "paper_ci", "paper_comparable", "image_size",
           "synthetic", "episode_list", "episode_hash", "dataset_fingerprint", "config_hash", "code_hash", "params", "device",
           "device_name", "threads", "executor", "pretrain_world_size", "precision", "fast_mode", "transductive",
           "torch_version", "python_version")

#: Of :data:`_SHARED`, how a run ran rather than what it is: seeds may differ in them (a seed run on another
#: machine, thread count or torch); the row then lists each seed's value, ``;``-separated, in seed order.
_PER_SEED = ("device", "device_name", "threads", "pretrain_world_size", "fast_mode", "torch_version", "python_version")

#: Summary fields that make two runs seeds of one experiment (with the identity's world size).
_SAME_CELL = ("config_hash", "dataset_fingerprint", "episode_hash", "split", "code_hash", "episodes")


def _same_cell(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Whether two run summaries are seeds of one experiment: the same cell config (the config with
    seed 0), dataset content, episode list and split, code, number of episodes and world size."""
    ia, ib = a.get("identity") or {}, b.get("identity") or {}
    return (all(a.get(k) == b.get(k) for k in _SAME_CELL)
            and ia.get("world_size", 1) == ib.get("world_size", 1))


def _finished_summary(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The summary of a finished run folder: ``summary.json`` whose identity is the folder's
    ``identity.json`` and whose ``run_id`` is the folder's name; None for anything else."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        identity = json.loads((run_dir / "identity.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("identity") != identity or summary.get("run_id") != run_dir.name:
        return None
    return summary if evidence_problem(run_dir, summary) is None else None


def cell_summaries(summaries: Sequence[Dict[str, Any]], results_dir: Path) -> List[Dict[str, Any]]:
    """``summaries`` and every other finished seed of the same experiment in ``<results_dir>/runs/``
    (:func:`_same_cell`), one per seed (those given win), in seed order.

    So a row keeps the seeds of earlier invocations (``--seeds 0,1`` then a plain rerun, or
    ``--seed 1`` after ``--seed 0``); seeds of other settings, code or data are never mixed in.
    """
    if not summaries:
        return []
    first = summaries[0]
    by_seed: Dict[int, Dict[str, Any]] = {int(s["seed"]): s for s in summaries}
    runs = Path(results_dir) / "runs"
    prefix = str(first.get("run_id", "")).rsplit("_seed", 1)[0] + "_seed"  # run ids of the cell's seeds
    try:
        candidates = sorted(d for d in runs.iterdir() if d.name.startswith(prefix) and d.is_dir())
    except OSError:
        candidates = []
    for d in candidates:
        s = _finished_summary(d)
        if s is not None and int(s.get("seed", -1)) not in by_seed and _same_cell(s, first):
            by_seed[int(s["seed"])] = s
    return [by_seed[k] for k in sorted(by_seed)]


def row_evidence_problem(row: Dict[str, Any], results_dir: Path) -> Optional[str]:
    """Why a leaderboard row is not backed by its runs, or None when it is: every run its ``run_id`` names
    (``;``-separated seeds) has its folder under ``<results_dir>/runs`` with a per-episode record that backs its
    summary (:func:`~fewshot_nsl.episode_log.evidence_problem`), and the row's accuracy is the mean those
    records give on the row's episodes (a hand-edited ``leaderboard.csv`` is caught here)."""
    from .errors import DataError

    ids = [r for r in key_text(row.get("run_id")).split(";") if r]
    if not ids:
        return "it names no run"
    n = pd.to_numeric(pd.Series([row.get("episodes")]), errors="coerce").iloc[0]
    means = []
    for rid in ids:
        d = Path(results_dir) / "runs" / rid
        if not d.is_dir():
            return f"its run folder runs/{rid} is gone"
        try:  # the record checked against its summary once (verified_accuracies), its first clause kept
            means.append(float(verified_accuracies(d, None if pd.isna(n) else int(n)).mean()))
        except DataError as exc:
            return str(exc).split(";")[0]
    acc = pd.to_numeric(pd.Series([row.get("accuracy")]), errors="coerce").iloc[0]
    mean = float(np.mean(means))
    if pd.isna(acc) or abs(float(acc) - mean) > 5e-4:
        return f"its accuracy {row.get('accuracy')} is not the {mean:.4f} its runs' episodes give"
    return None


def aggregate(summaries: Sequence[Dict[str, Any]], results_dir: Path, other_seeds: bool = True) -> Dict[str, Any]:
    """The leaderboard row of a cell from the summaries of its seeds.

    ``accuracy`` is the mean of the per-seed means; ``ci95``/``ci95_t``/``std`` are the episode
    statistics of the per-episode accuracies averaged over seeds (one value per test episode, so
    ``n`` is the number of episodes, and with one seed they are that seed's statistics);
    ``seed_std`` is the sample standard deviation of the per-seed means (empty for one seed).
    A failed (non-finite) episode counts as wrong (0); ``episodes_failed`` adds them up over seeds.
    Times add up over seeds, peak memory is the maximum.

    Args:
        other_seeds: also aggregate the cell's other finished seeds in ``<results_dir>/runs/``
            (:func:`cell_summaries`).
    """
    if not summaries:
        raise ValueError("aggregate needs at least one run summary")
    summaries = cell_summaries(summaries, results_dir) if other_seeds else sorted(summaries, key=lambda s: int(s["seed"]))
    n = int(summaries[0]["episodes"])
    mat = np.stack([verified_accuracies(Path(results_dir) / "runs" / s["run_id"], n) for s in summaries])
    per_episode = mat.mean(axis=0)
    ep = summarize(per_episode)
    seed_means = mat.mean(axis=1)
    row: Dict[str, Any] = {k: summaries[0].get(k) for k in _SHARED}
    row["precision"] = row.get("precision") or "fp32"  # summaries written before the option ran in fp32

    def total(key: str) -> Optional[float]:
        vals = [s.get(key) for s in summaries]
        return None if any(v is None for v in vals) else round(float(sum(vals)), 2)

    row.update({
        "accuracy": round(float(np.mean(seed_means)), 4),
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
    # how each seed ran: every seed's value where they differ (the README's "pass the row's threads")
    for k in _PER_SEED:
        values = list(dict.fromkeys(key_text(s.get(k)) for s in summaries))
        if len(values) > 1:
            row[k] = ";".join(values)
    return row
