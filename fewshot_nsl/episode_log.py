"""A run's per-episode log (``episodes.csv``): what is missing, merging shard rows, per-episode accuracies."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional

import numpy as np

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
