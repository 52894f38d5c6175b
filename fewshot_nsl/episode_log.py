"""A run's per-episode log (``episodes.csv``): what is missing, merging shard rows, per-episode accuracies, and
whether the log still backs the run's ``summary.json`` (the evidence of its leaderboard row)."""
from __future__ import annotations

import csv
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional

import numpy as np

from .errors import DataError
from .evaluation import FIELDS, episode_accuracy, read_episode_results
from .safe_io import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    from .runner import RunContext


def missing_episodes(ctx: RunContext) -> List[int]:
    """Indices of episodes without a finished row in ``episodes.csv``."""
    done = read_episode_results(ctx.episodes_csv)
    return [i for i in range(ctx.n_episodes) if i not in done]


def merge_episode_rows(csv_path: Path, rows: Iterable[Dict[str, Any]]) -> None:
    """Add ``rows`` (``evaluation.FIELDS`` dicts) to an episodes CSV, keeping one row per episode
    in episode order; rewritten atomically (temp file, fsync, rename)."""
    csv_path = Path(csv_path)
    merged = {int(k): {f: str(v[f]) for f in FIELDS} for k, v in read_episode_results(csv_path).items()}
    for r in rows:
        merged.setdefault(int(r["episode"]), {f: str(r[f]) for f in FIELDS})
    def write(f) -> None:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for k in sorted(merged):
            w.writerow(merged[k])

    atomic_write(csv_path, write)


def salvage_shards(ctx: RunContext) -> int:
    """Merge rows left in ``shards/*.csv`` by interrupted shard tasks into ``episodes.csv``."""
    shard_dir = ctx.run_dir / "shards"
    if not shard_dir.is_dir():
        return 0
    rows: List[Dict[str, str]] = []
    files = sorted(shard_dir.glob("*.csv"))
    for f in files:
        rows += list(read_episode_results(f).values())
    if rows:
        merge_episode_rows(ctx.episodes_csv, rows)
    for f in files:
        f.unlink()
    try:
        shard_dir.rmdir()
    except OSError:
        pass
    return len(rows)


def episode_accuracies(run_dir: Path, n: Optional[int] = None) -> np.ndarray:
    """Per-episode accuracies (%) of a run, in episode order: 0 for a failed (``nonfinite``)
    episode, which counts as wrong; NaN only for an episode without a finished row."""
    rows = read_episode_results(Path(run_dir) / "episodes.csv")
    n = n if n is not None else (max(rows) + 1 if rows else 0)
    out = np.full(n, np.nan)
    for i, r in rows.items():
        if i < n:
            out[i] = episode_accuracy(r)
    return out


# ----------------------------------------------------------------------------- evidence
#: ``summary.json`` key holding the sha256 of the run's canonical ``episodes.csv`` when it finished.
EPISODES_DIGEST = "episodes_sha256"


def episodes_sha256(csv_path: Path) -> str:
    """sha256 (hex) of the bytes of an ``episodes.csv``."""
    return hashlib.sha256(Path(csv_path).read_bytes()).hexdigest()


def _read_summary(run_dir: Path) -> Optional[Dict[str, Any]]:
    try:
        s = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) else None


def evidence_problem(run_dir: Path, summary: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """Why the per-episode record of a finished run cannot back its ``summary.json``, or None when it does.

    A run records the sha256 of its canonical ``episodes.csv`` in its summary (:data:`EPISODES_DIGEST`) when it
    finishes; any later change of the file (an edited, added or lost row) is a mismatch. Summaries written before
    the digest existed are checked on the content instead: a row for each of the summary's ``episodes``, each
    ``ok`` row's accuracy equal to its ``correct / total``, and their mean equal to the summary's accuracy.

    Args:
        run_dir: the run folder.
        summary: its summary (read from ``run_dir/summary.json`` when None).

    Returns:
        A phrase that completes "run <id>: ...", e.g. ``"its episodes.csv was changed after the run finished
        (sha256 ...)"``; None when the record backs the summary.
    """
    run_dir = Path(run_dir)
    summary = summary if summary is not None else _read_summary(run_dir)
    if summary is None:
        return "it has no finished summary (summary.json)"
    path = run_dir / "episodes.csv"
    if not path.is_file():
        return "its per-episode record (episodes.csv) is gone"
    recorded = summary.get(EPISODES_DIGEST)
    if recorded is not None:
        actual = episodes_sha256(path)
        if actual != recorded:
            return (f"its episodes.csv was changed after the run finished (sha256 {actual[:12]}, summary.json "
                    f"recorded {str(recorded)[:12]})")
        return None
    try:
        n = int(summary["episodes"])
        accuracy = float(summary["accuracy"])
    except (KeyError, TypeError, ValueError):
        return "its summary.json has no episode count or accuracy"
    rows = read_episode_results(path)
    missing = [i for i in range(n) if i not in rows]
    if missing:
        return f"its episodes.csv has no row for episode(s) {missing[:5]} of the {n} its summary counts"
    for i in range(n):
        r = rows[i]
        if r.get("status") != "ok":
            continue
        try:
            consistent = abs(float(r["accuracy"]) - 100.0 * float(r["correct"]) / float(r["total"])) < 1e-4
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            consistent = False
        if not consistent:
            return (f"the row of episode {i} in its episodes.csv is inconsistent (accuracy {r.get('accuracy')} for "
                    f"{r.get('correct')} of {r.get('total')} correct)")
    mean = float(np.mean([episode_accuracy(rows[i]) for i in range(n)])) if n else 0.0
    if abs(mean - accuracy) > 5e-4:
        return f"its episodes.csv gives {mean:.4f}%, not the {accuracy:.4f}% of its summary.json"
    return None


def verified_accuracies(run_dir: Path, n: Optional[int] = None) -> np.ndarray:
    """Per-episode accuracies (%) of a finished run whose record backs its summary (:func:`evidence_problem`),
    episodes ``0..n-1`` (``n`` None: the summary's ``episodes``); a failed (non-finite) episode counts as wrong (0).

    Raises:
        DataError: one line naming the run and what is wrong with its record, or that it lacks episodes.
    """
    run_dir = Path(run_dir)
    summary = _read_summary(run_dir)
    problem = evidence_problem(run_dir, summary) if run_dir.is_dir() else "its run folder is gone"
    if problem is not None:
        raise DataError(f"run {run_dir.name}: {problem}; run the command that made it again to evaluate it again "
                        f"(the changed file is kept aside), or --rerun it")
    assert summary is not None
    n = int(summary["episodes"]) if n is None else int(n)
    rows = read_episode_results(run_dir / "episodes.csv")
    missing = [i for i in range(n) if i not in rows]
    if missing:
        raise DataError(f"run {run_dir.name} has no result for episode(s) {missing[:5]} of {n}; "
                        f"run the same command again to finish it")
    return np.array([episode_accuracy(rows[i]) for i in range(n)])


def set_aside_unbacked_record(run_dir: Path, log: Callable[[str], None]) -> Optional[str]:
    """Before a run goes on in ``run_dir``: if it has a ``summary.json`` that its ``episodes.csv`` does not back
    (:func:`evidence_problem`), rename both (``<name>.rejected-<UTC time>``: kept, never deleted) so the run
    evaluates its episodes again instead of resuming from rows nobody can vouch for, and say so in one
    ``warning:`` line. Returns the problem, or None when there was nothing to set aside."""
    run_dir = Path(run_dir)
    summary = _read_summary(run_dir)
    if summary is None:
        return None
    problem = evidence_problem(run_dir, summary)
    if problem is None:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    kept = []
    for name in ("episodes.csv", "summary.json"):
        p = run_dir / name
        if p.is_file():
            p.rename(run_dir / f"{name}.rejected-{stamp}")
            kept.append(f"{name}.rejected-{stamp}")
    log(f"warning: run {run_dir.name}: {problem}; kept aside as {', '.join(kept)}; its test episodes are "
        f"evaluated again")
    return problem
