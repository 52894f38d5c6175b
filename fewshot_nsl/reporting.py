"""Leaderboard CSV, Table-6-style markdown and a bar plot, all rendered from the CSV alone.

The leaderboard has one row per (dataset, method, backbone, ways, shots, profile); a new
result for the same key replaces the old row. Updates take an exclusive file lock and
replace the file atomically, so concurrent runs never corrupt it.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pandas as pd
import yaml

from .config import CONFIG_DIR

KEY = ["dataset", "method", "backbone", "ways", "shots", "profile"]
COLUMNS = KEY + [
    "accuracy", "ci95", "ci95_t", "std", "episodes", "episodes_failed", "paper_value", "paper_ci",
    "image_size", "synthetic", "episode_list", "episode_hash", "dataset_fingerprint", "config_hash",
    "seeds", "params", "train_time_s", "eval_time_s", "wall_time_s", "peak_memory_mb", "device",
    "torch_version", "git_commit", "git_dirty", "run_id", "finished_at",
]


def paper_rows() -> List[Dict[str, Any]]:
    """Rows of the paper's Table 6 with the suite method reproducing each."""
    return yaml.safe_load((CONFIG_DIR / "table6.yaml").read_text())["rows"]


def paper_value(method: str, backbone: str, ways: int, shots: int) -> tuple:
    """``(mean, ci)`` the paper reports for this cell (Mini-ImageNet), or ``(None, None)``."""
    if ways != 5:
        return None, None
    for r in paper_rows():
        if r["method"] == method and r["backbone"] == backbone and r["shots"] == shots:
            return r["paper"], r["paper_ci"]
    return None, None


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path``.lock for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_leaderboard(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=COLUMNS)
    return pd.read_csv(path)


def upsert_row(path: Path, row: Dict[str, Any]) -> pd.DataFrame:
    """Insert or replace the row with the same key; returns the new leaderboard."""
    path = Path(path)
    with locked(path):
        df = read_leaderboard(path)
        if len(df):
            same = pd.Series(True, index=df.index)
            for k in KEY:
                same &= df[k].astype(str) == str(row[k])
            df = df[~same]
        new = pd.DataFrame([{c: row.get(c) for c in COLUMNS} | {k: v for k, v in row.items() if k not in COLUMNS}])
        df = new if df.empty else pd.concat([df, new], ignore_index=True)
        df = df.sort_values(KEY, kind="stable").reset_index(drop=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
    return df


def _fmt(mean: Any, ci: Any) -> str:
    if mean is None or pd.isna(mean):
        return "-"
    return f"{float(mean):.2f} ± {float(ci):.2f}"


def table6_markdown(df: pd.DataFrame) -> str:
    """Table-6-style markdown: one table per (dataset, ways, profile), shots as columns."""
    if df.empty:
        return "# Results\n\nNo results yet.\n"
    out = ["# Few-shot results (Table-6 style)", ""]
    out.append(
        "Mean accuracy (%) ± 95% CI (1.96·std/√n) over the fixed test episodes. "
        "`paper` is the NSL paper's Table 6 value on Mini-ImageNet (5-way 5-shot)."
    )
    out.append("")
    for (dataset, ways, profile), g in df.groupby(["dataset", "ways", "profile"], sort=True):
        synthetic = bool(g["synthetic"].fillna(False).astype(bool).any())
        out.append(f"## {dataset}, {ways}-way, profile `{profile}`")
        out.append("")
        if synthetic:
            out.append(
                f"*{dataset} is synthetic; its numbers are NOT comparable with the paper's Mini-ImageNet values, "
                "which are shown for orientation only.*"
            )
            out.append("")
        shots = sorted(int(s) for s in g["shots"].unique())
        header = ["Method", "Backbone"] + [f"{s}-shot" for s in shots] + ["paper (5-shot)", "episodes", "params"]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        for (method, backbone), m in g.groupby(["method", "backbone"], sort=False):
            cells = [method, backbone]
            for s in shots:
                r = m[m["shots"] == s]
                cells.append(_fmt(r["accuracy"].iloc[0], r["ci95"].iloc[0]) if len(r) else "-")
            pv, pc = paper_value(method, backbone, int(ways), 5)
            cells.append(_fmt(pv, pc))
            cells.append(str(int(m["episodes"].max())))
            cells.append(f"{int(m['params'].max()):,}" if pd.notna(m["params"].max()) else "-")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot_leaderboard(df: pd.DataFrame, path: Path) -> Optional[Path]:
    """Horizontal bars of accuracy with 95% CI whiskers per (method, backbone, shots); paper value marked."""
    if df.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(df.groupby(["dataset", "ways", "profile"], sort=True))
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 0.45 * len(df) + 1.6 * len(groups)), squeeze=False)
    for ax, ((dataset, ways, profile), g) in zip(axes[:, 0], groups):
        g = g.sort_values(["shots", "accuracy"])
        labels = [f"{r.method} ({r.backbone}, {int(r.shots)}-shot)" for r in g.itertuples()]
        y = range(len(g))
        ax.barh(list(y), g["accuracy"], xerr=g["ci95"], color="#4c72b0", ecolor="black", capsize=3)
        for yi, r in zip(y, g.itertuples()):
            pv, _ = paper_value(r.method, r.backbone, int(r.ways), int(r.shots))
            if pv is not None:
                ax.plot([pv], [yi], marker="D", color="#dd8452", label="paper (Mini-ImageNet)" if yi == 0 else None)
        ax.set_yticks(list(y))
        ax.set_yticklabels(labels, fontsize=8)
        ax.axvline(100.0 / int(ways), color="grey", linestyle=":", label="chance")
        ax.set_xlim(0, 100)
        ax.set_xlabel("accuracy (%) with 95% CI")
        syn = " (synthetic)" if bool(g["synthetic"].fillna(False).astype(bool).any()) else ""
        ax.set_title(f"{dataset}{syn}, {ways}-way, profile {profile}", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".tmp{os.getpid()}-" + path.name)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def render_reports(results_dir: Path) -> Dict[str, Path]:
    """Regenerate ``table6.md`` and ``leaderboard.png`` from ``leaderboard.csv``."""
    results_dir = Path(results_dir)
    df = read_leaderboard(results_dir / "leaderboard.csv")
    md = results_dir / "table6.md"
    tmp = md.with_name(md.name + f".tmp{os.getpid()}")
    tmp.write_text(table6_markdown(df))
    os.replace(tmp, md)
    out = {"markdown": md}
    png = plot_leaderboard(df, results_dir / "leaderboard.png")
    if png:
        out["plot"] = png
    return out
