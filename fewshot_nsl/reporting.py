"""Leaderboard CSV, paired comparisons, Table-6-style markdown, summaries and a plot.

The leaderboard has one row per experiment: :data:`KEY` = dataset name and content fingerprint,
split, episode list, image size, method, backbone, ways, shots and profile (two rows that differ in
any of these are different experiments); a new result for the same key replaces the old row
(a re-run with other code or settings of the same experiment). Updates take an exclusive file lock and
replace the file atomically (temp file, fsync, rename), so concurrent runs never corrupt it.

Everything here is rendered from CSVs alone: ``leaderboard.csv`` and, for the paired
comparisons, the per-episode ``runs/<run_id>/episodes.csv`` of the runs a row names. Every
method is evaluated on the same fixed episodes, so each row is compared episode by episode
with a reference method (``ref_method``, default ``protonet``) of the same dataset, ways,
shots and profile: mean paired difference with its 95% CI, paired t-test and Wilcoxon p-values.
"""
from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import yaml

from .config import CONFIG_DIR
from .errors import ConfigError
from .safe_io import atomic_write, atomic_write_text, locked, remove_stale_tmp

KEY = ["dataset", "dataset_fingerprint", "split", "episode_hash", "image_size", "method", "backbone", "ways", "shots",
       "profile"]
#: The key of leaderboards written before the split and identity columns existed (read, upgraded).
LEGACY_KEY = ["dataset", "method", "backbone", "ways", "shots", "profile"]
#: Rows of one rendered table: the same data, split, ways, profile and image size.
GROUP = ["dataset", "dataset_fingerprint", "split", "ways", "profile", "image_size"]
#: Paired comparison with the reference method (see :func:`add_paired_columns`).
PAIRED = ["ref_method", "ref_backbone", "diff_vs_ref", "diff_ci95", "p_vs_ref", "p_wilcoxon_vs_ref", "n_paired"]
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
DEFAULT_REFERENCE = "protonet"


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


# ----------------------------------------------------------------------------- leaderboard file
def key_text(v: Any) -> str:
    """A key value as text, the same whether it came from a run (``84``, ``None``) or was read
    back from the CSV (``84.0``, ``NaN``)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and float(v).is_integer():
        return str(int(v))
    return str(v)


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


# ----------------------------------------------------------------------------- paired comparisons
def run_dirs_of(results_dir: Path, run_ids: Any) -> List[Path]:
    """Run folders named by a leaderboard ``run_id`` cell (``;``-separated for several seeds)."""
    if run_ids is None or (isinstance(run_ids, float) and math.isnan(run_ids)):
        return []
    return [Path(results_dir) / "runs" / r for r in str(run_ids).split(";") if r]


def episode_vector(run_dirs: Sequence[Path]) -> Optional[np.ndarray]:
    """Per-episode accuracy (%) averaged over the given runs (seeds), from their episodes CSVs;
    NaN where an episode failed in any run; None if a run's CSV is missing."""
    vectors = []
    for d in run_dirs:
        p = Path(d) / "episodes.csv"
        if not p.is_file():
            return None
        vals: Dict[int, float] = {}
        with p.open(newline="") as f:
            for r in csv.DictReader(f):
                try:
                    vals[int(r["episode"])] = float(r["accuracy"]) if r.get("status") == "ok" else math.nan
                except (TypeError, ValueError, KeyError):
                    continue
        n = max(vals) + 1 if vals else 0
        v = np.full(n, np.nan)
        for i, a in vals.items():
            v[i] = a
        vectors.append(v)
    if not vectors:
        return None
    n = min(len(v) for v in vectors)
    return np.stack([v[:n] for v in vectors]).mean(axis=0)


def _pick_reference(df: pd.DataFrame, i: Any, reference: str) -> Optional[Any]:
    r = df.loc[i]
    cand = df[(df["method"].astype(str) == reference) & (df.index != i)]
    for k in ("dataset", "dataset_fingerprint", "split", "image_size", "ways", "shots", "profile", "episode_hash"):
        cand = cand[cand[k].map(key_text) == key_text(r[k])]
    if cand.empty:
        return None
    same = cand[cand["backbone"].astype(str) == str(r["backbone"])]
    if len(same):
        return same.index[0]
    return cand.sort_values("backbone", key=lambda s: s.astype(str) != "cnn4", kind="stable").index[0]


def add_paired_columns(df: pd.DataFrame, results_dir: Path, reference: Optional[str] = None) -> pd.DataFrame:
    """Fill :data:`PAIRED` for every row: paired difference (row - reference, in accuracy
    points) over the episodes both evaluated, its 95% CI (1.96 std / sqrt(n) of the differences),
    and paired t-test / Wilcoxon p-values (:func:`fewshot_nsl.stats.paired_compare`).

    The reference is the ``reference`` method's row with the same dataset (name and content), split,
    image size, ways, shots, profile and episode hash, preferably with the same backbone. Rows whose runs' CSVs are gone keep the
    values they had. ``reference`` None: the leaderboard's current one, else ``protonet``.
    """
    from .stats import paired_compare

    df = df.copy()
    for c in PAIRED:
        if c not in df.columns:
            df[c] = None
    df[PAIRED] = df[PAIRED].astype(object)
    if reference is None:
        current = df["ref_method"].dropna().astype(str)
        reference = current.mode().iloc[0] if len(current) else DEFAULT_REFERENCE
    cache: Dict[str, Optional[np.ndarray]] = {}

    def vector(i: Any) -> Optional[np.ndarray]:
        key = str(df.at[i, "run_id"])
        if key not in cache:
            cache[key] = episode_vector(run_dirs_of(results_dir, df.at[i, "run_id"]))
        return cache[key]

    for i in df.index:
        if str(df.at[i, "method"]) == reference:
            df.loc[i, PAIRED] = [reference, df.at[i, "backbone"], None, None, None, None, None]
            continue
        j = _pick_reference(df, i, reference)
        if j is None:
            df.loc[i, PAIRED] = [None] * len(PAIRED)
            continue
        a, b = vector(i), vector(j)
        if a is None or b is None:
            if str(df.at[i, "ref_method"]) != reference:  # cannot recompute: clear stale values
                df.loc[i, PAIRED] = [None] * len(PAIRED)
            continue
        n = min(len(a), len(b))
        pc = paired_compare(a[:n], b[:n])
        df.loc[i, PAIRED] = [reference, df.at[j, "backbone"], round(pc.mean_diff, 4), round(pc.ci95, 4),
                             float(f"{pc.p_value:.4g}"), float(f"{pc.wilcoxon_p:.4g}"), pc.n]
    return df


def resolve_run(spec: str, results_dir: Path) -> Path:
    """A run folder from a run id (under ``results_dir/runs``) or a path to the folder."""
    p = Path(spec)
    for cand in (p, Path(results_dir) / "runs" / spec):
        if cand.is_dir() and (cand / "episodes.csv").is_file():
            return cand
    raise ConfigError(f"run '{spec}' not found: pass a run folder or a run id under {Path(results_dir) / 'runs'}")


def _run_meta(d: Path) -> Dict[str, Any]:
    for name in ("summary.json",):
        try:
            return json.loads((d / name).read_text())
        except (OSError, ValueError):
            pass
    raise ConfigError(f"run {d} has not finished (no summary.json); finish it before comparing")


def compare_runs(a: str, b: str, results_dir: Path) -> str:
    """Paired comparison of two finished runs on their common episodes, as printable text.

    Raises:
        ConfigError: a run is missing or unfinished, or the two used different episode lists.
    """
    from .stats import paired_compare, summarize

    da, db = resolve_run(a, results_dir), resolve_run(b, results_dir)
    ma, mb = _run_meta(da), _run_meta(db)
    if ma.get("episode_hash") != mb.get("episode_hash"):
        raise ConfigError(
            f"runs {da.name} and {db.name} were evaluated on different episode lists "
            f"({ma.get('episode_hash')} vs {mb.get('episode_hash')}); a paired comparison needs the same episodes"
        )
    va, vb = episode_vector([da]), episode_vector([db])
    n = min(len(va), len(vb))
    pc = paired_compare(va[:n], vb[:n])
    sa, sb = summarize(va[:n]), summarize(vb[:n])
    sig = "significant" if pc.p_value < 0.05 else "not significant"
    lines = [
        f"A: {da.name}  ({ma['method']} {ma['backbone']}, seed {ma.get('seed')})",
        f"B: {db.name}  ({mb['method']} {mb['backbone']}, seed {mb.get('seed')})",
        f"episodes: {pc.n} paired (episode list {ma['episode_hash']}, {ma['ways']}-way {ma['shots']}-shot, {ma['dataset']})",
        f"A: {sa.mean:.2f} +- {sa.ci95:.2f}   B: {sb.mean:.2f} +- {sb.ci95:.2f}   (mean accuracy %, 95% CI)",
        f"A - B: {pc.mean_diff:+.2f} +- {pc.ci95:.2f} points (95% CI of the paired difference)",
        f"paired t-test: t = {pc.t_stat:.3f}, p = {pc.p_value:.4g}; Wilcoxon signed-rank p = {pc.wilcoxon_p:.4g} "
        f"({sig} at 0.05)",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- markdown
def _fmt(mean: Any, ci: Any) -> str:
    if mean is None or pd.isna(mean):
        return "-"
    return f"{float(mean):.2f} ± {float(ci):.2f}"


def _fmt_p(p: Any) -> str:
    if p is None or pd.isna(p):
        return ""
    return "p<0.001" if float(p) < 0.001 else f"p={float(p):.3f}"


def _fmt_diff(r: pd.Series) -> str:
    if str(r.get("method")) == str(r.get("ref_method")):
        return "reference"
    d = r.get("diff_vs_ref")
    if d is None or pd.isna(d):
        return "-"
    other = "" if str(r.get("ref_backbone")) == str(r.get("backbone")) else f" vs {r.get('ref_backbone')}"
    return f"{float(d):+.2f} ± {float(r['diff_ci95']):.2f} ({_fmt_p(r.get('p_vs_ref'))}{other})"


def _n_seeds(r: Any) -> int:
    n = r.get("n_seeds")
    return 1 if n is None or pd.isna(n) else int(n)


def _acc_cell(r: pd.Series) -> str:
    cell = _fmt(r["accuracy"], r["ci95"])
    ss = r.get("seed_std")
    if ss is not None and pd.notna(ss) and _n_seeds(r) > 1:
        cell += f" (seed sd {float(ss):.2f})"
    return cell


def _groups(df: pd.DataFrame):
    """Tables of rows on the same data (name and content), split, ways, profile and image size."""
    df = df.copy()
    for c in GROUP:
        df[c] = df[c].map(key_text) if c in df.columns else ""
    return df.groupby(GROUP, sort=True)


def _group_title(key: Tuple) -> str:
    """``glyphs (data 1a2b3c4d), test split, 5-way, profile `quick`, 84 px``."""
    dataset, fingerprint, split, ways, profile, image_size = key
    px = f", {image_size} px" if image_size else ""
    return f"{dataset} (data {str(fingerprint)[:8]}), {split} split, {ways}-way, profile `{profile}`{px}"


def _is_true(v: Any) -> bool:
    return str(v) in ("True", "true", "1", "1.0")


def _ref_name(g: pd.DataFrame) -> str:
    refs = g["ref_method"].dropna().astype(str) if "ref_method" in g else pd.Series(dtype=str)
    return refs.mode().iloc[0] if len(refs) else DEFAULT_REFERENCE


def table6_markdown(df: pd.DataFrame) -> str:
    """Table-6-style markdown: one table per (dataset and its content, split, ways, profile, image
    size), shots as columns, with the paired difference to the reference method per shot. The
    paper's value is a column only where the table is comparable with it (:func:`paper_comparable`);
    elsewhere it is given for orientation, with the reason."""
    if df.empty:
        return "# Results\n\nNo results yet.\n"
    out = ["# Few-shot results (Table-6 style)", ""]
    out.append(
        "Mean accuracy (%) ± 95% CI (1.96·std/√n over the fixed test episodes; with several training "
        "seeds, over the seed-averaged episodes, and `seed sd` is the std of the per-seed means). "
        "`Δ vs <ref>`: paired difference to the reference method on the same episodes ± its 95% CI, "
        "with the paired t-test p-value. `paper` is the NSL paper's Table 6 value on Mini-ImageNet "
        "(5-way 5-shot; the paper reports no 1-shot values), shown as a column only for Mini-ImageNet test "
        "rows of the `paper` profile at 84 px; elsewhere it is marked *for orientation*."
    )
    out.append("")
    for key, g in _groups(df):
        dataset, _, split, ways, profile, image_size = key
        synthetic = bool(g["synthetic"].fillna(False).astype(str).isin(["True", "true", "1"]).any())
        comparable, why = paper_comparable(dataset, profile, image_size, split)
        ref = _ref_name(g)
        out.append(f"## {_group_title(key)}")
        out.append("")
        if synthetic:
            out.append(
                f"*{dataset} is synthetic; its numbers are NOT comparable with the paper's Mini-ImageNet values, "
                "which are shown for orientation only.*"
            )
            out.append("")
        elif not comparable:
            out.append(f"*Not comparable with the paper's Table 6 ({why}); its values are shown for orientation only.*")
            out.append("")
        shots = sorted(int(s) for s in g["shots"].unique())
        paper_col = "paper (5-shot)" if comparable else "paper (5-shot, for orientation)"
        header = (["Method", "Backbone"] + [f"{s}-shot" for s in shots] + [f"Δ vs {ref} ({s}-shot)" for s in shots]
                  + [paper_col, "seeds", "episodes", "params"])
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        for (method, backbone), m in g.groupby(["method", "backbone"], sort=False):
            cells = [str(method), str(backbone)]
            diffs = []
            for s in shots:
                r = m[m["shots"].astype(int) == s]
                # several rows: the same cell on different episode lists (e.g. --episodes FILE)
                tag = (lambda x: f" [episodes {str(x['episode_hash'])[:8]}]") if len(r) > 1 else (lambda x: "")
                cells.append("; ".join(_acc_cell(x) + tag(x) for _, x in r.iterrows()) if len(r) else "-")
                diffs.append("; ".join(_fmt_diff(x) for _, x in r.iterrows()) if len(r) else "-")
            cells += diffs
            pv, pc = paper_value(method, backbone, int(ways), 5)
            cells.append(_fmt(pv, pc))
            seeds = m["seeds"].dropna().astype(str).unique() if "seeds" in m else []
            cells.append(" / ".join(seeds) if len(seeds) else "-")
            cells.append(str(int(pd.to_numeric(m["episodes"]).max())))
            params = pd.to_numeric(m["params"], errors="coerce").max()
            cells.append(f"{int(params):,}" if pd.notna(params) else "-")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    others = paper_only_rows()
    if others:
        out.append("Other rows of the paper's Table 6 (backbones this suite does not implement): "
                   + "; ".join(f"{r['label']} ({r['backbone']}) {_fmt(r['paper'], r['paper_ci'])}" for r in others)
                   + ".")
        out.append("")
    return "\n".join(out)


def _summary_frame(g: pd.DataFrame) -> pd.DataFrame:
    """The per-row table of the run summary (strings, ready to print)."""
    def num(v: Any, fmt: str) -> str:
        return "-" if v is None or pd.isna(v) else format(float(v), fmt)

    rows = []
    for _, r in g.sort_values(["shots", "method", "backbone"]).iterrows():
        commit = "" if pd.isna(r.get("git_commit")) or not r.get("git_commit") else str(r.get("git_commit"))
        if not commit and pd.notna(r.get("version")) and r.get("version"):  # an installed copy: its version
            commit = f"v{r.get('version')}"
        rows.append({
            "method": r["method"], "backbone": r["backbone"], "shots": int(r["shots"]), "split": r.get("split"),
            "accuracy ± CI95": _fmt(r["accuracy"], r["ci95"]), "t-CI95": num(r.get("ci95_t"), ".2f"),
            "seed sd": num(r.get("seed_std"), ".2f"), "seeds": r.get("seeds"),
            "Δ vs ref": _fmt_diff(r), "Wilcoxon p": _fmt_p(r.get("p_wilcoxon_vs_ref")) or "-",
            "paper": _fmt(r.get("paper_value"), r.get("paper_ci")) + (
                "" if _is_true(r.get("paper_comparable")) or pd.isna(r.get("paper_value")) else " (orientation)"),
            "episodes": int(r["episodes"]), "failed": int(r.get("episodes_failed") or 0),
            "params": f"{int(r['params']):,}" if pd.notna(r.get("params")) else "-",
            "train s": num(r.get("train_time_s"), ".1f"), "eval s": num(r.get("eval_time_s"), ".1f"),
            "wall s": num(r.get("wall_time_s"), ".1f"), "peak MB": num(r.get("peak_memory_mb"), ".0f"),
            "device": f"{r.get('device')} x{r.get('threads')}" if pd.notna(r.get("threads")) else str(r.get("device")),
            "executor": r.get("executor", "-"),
            "commit": (commit if commit.startswith("v") else commit[:8]) + ("+dirty" if str(r.get("git_dirty")) in ("True", "true", "1") else ""),
            "config": str(r.get("config_hash"))[:8], "episode list": str(r.get("episode_hash"))[:8],
        })
    return pd.DataFrame(rows)


def _md_table(t: pd.DataFrame) -> List[str]:
    out = ["| " + " | ".join(map(str, t.columns)) + " |", "|" + "---|" * len(t.columns)]
    for _, r in t.iterrows():
        out.append("| " + " | ".join(str(v) for v in r.values) + " |")
    return out


def summary_markdown(df: pd.DataFrame, title: str = "Benchmark summary",
                     cells: Optional[Sequence[Dict[str, Any]]] = None) -> str:
    """Every leaderboard row with its statistics and provenance, one table per (dataset, ways, profile).

    Args:
        cells: for a grid summary, the grid's cells (``method``, ``backbone``, ``shots``); cells
            without a row are listed as missing.
    """
    out = [f"# {title}", ""]
    if df.empty:
        return "\n".join(out + ["No results yet.", ""])
    out.append("Rendered from `leaderboard.csv` (and the runs' `episodes.csv` for the paired columns); "
               "columns are explained in `results/README.md`.")
    out.append("")
    for key, g in _groups(df):
        wall = pd.to_numeric(g["wall_time_s"], errors="coerce").sum()
        out.append(f"## {_group_title(key)}: {len(g)} cells, "
                   f"{wall / 60:.1f} min of run time, reference `{_ref_name(g)}`")
        out.append("")
        out += _md_table(_summary_frame(g))
        out.append("")
        if cells:
            have = {(str(r.method), str(r.backbone), int(r.shots)) for r in g.itertuples()}
            missing = [c for c in cells if (c["method"], c["backbone"], int(c["shots"])) not in have]
            if missing:
                out.append("Grid cells without a result: " + ", ".join(
                    f"{c['method']} {c['backbone']} {c['shots']}-shot" for c in missing) + ".")
                out.append("")
    return "\n".join(out)


def summary_html(df: pd.DataFrame, title: str = "Benchmark summary", plot: Optional[str] = None,
                 cells: Optional[Sequence[Dict[str, Any]]] = None) -> str:
    """The same content as :func:`summary_markdown` as a standalone HTML page."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}</style>",
             f"</head><body><h1>{html.escape(title)}</h1>"]
    if plot:
        parts.append(f"<p><img src='{html.escape(plot)}' style='max-width:100%'></p>")
    if df.empty:
        parts.append("<p>No results yet.</p>")
    for key, g in _groups(df):
        syn = " (synthetic: not comparable with Mini-ImageNet)" if g["synthetic"].astype(str).isin(["True", "true"]).any() else ""
        parts.append(f"<h2>{html.escape(_group_title(key).replace('`', ''))}{syn}</h2>")
        parts.append(_summary_frame(g).to_html(index=False, escape=True))
        if cells:
            have = {(str(r.method), str(r.backbone), int(r.shots)) for r in g.itertuples()}
            missing = [c for c in cells if (c["method"], c["backbone"], int(c["shots"])) not in have]
            if missing:
                parts.append("<p>Grid cells without a result: " + html.escape(", ".join(
                    f"{c['method']} {c['backbone']} {c['shots']}-shot" for c in missing)) + "</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- plot
def plot_leaderboard(df: pd.DataFrame, path: Path) -> Optional[Path]:
    """Horizontal bars of accuracy with 95% CI whiskers per (method, backbone, shots); paper value marked."""
    if df.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(_groups(df))
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 0.45 * len(df) + 1.6 * len(groups)), squeeze=False)
    for ax, (key, g) in zip(axes[:, 0], groups):
        dataset, _, split, ways, profile, image_size = key
        comparable, _ = paper_comparable(dataset, profile, image_size, split)
        g = g.assign(shots=g["shots"].astype(int)).sort_values(["shots", "accuracy"])
        labels = [f"{r.method} ({r.backbone}, {int(r.shots)}-shot)" for r in g.itertuples()]
        y = list(range(len(g)))
        ax.barh(y, g["accuracy"].astype(float), xerr=g["ci95"].astype(float), color="#4c72b0", ecolor="black", capsize=3,
                label="accuracy ± 95% CI")
        marked = False
        for yi, r in zip(y, g.itertuples()):
            pv, _ = paper_value(r.method, r.backbone, int(r.ways), int(r.shots))
            if pv is not None:
                ax.plot([pv], [yi], marker="D" if comparable else "d", color="#dd8452" if comparable else "#bbbbbb",
                        linestyle="none", label=None if marked else
                        ("paper (Mini-ImageNet)" if comparable else "paper (Mini-ImageNet, for orientation)"))
                marked = True
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=8)
        ax.axvline(100.0 / int(ways), color="grey", linestyle=":", label="chance")
        ax.set_xlim(0, 100)
        ax.set_xlabel("accuracy (%) with 95% CI")
        syn = " (synthetic)" if g["synthetic"].astype(str).isin(["True", "true"]).any() else ""
        ax.set_title(f"{_group_title(key).replace('`', '')}{syn}", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    try:
        atomic_write(Path(path), lambda f: fig.savefig(f, dpi=110, format="png"), binary=True)
    finally:
        plt.close(fig)
    return Path(path)


def _write_text(path: Path, text: str) -> Path:
    return atomic_write_text(path, text)


def render_reports(results_dir: Path, reference: Optional[str] = None,
                   grid: Optional[Tuple[str, Sequence[Dict[str, Any]]]] = None) -> Dict[str, Path]:
    """Regenerate ``table6.md``, ``leaderboard.png``, ``summary.md`` and ``summary.html`` from
    ``leaderboard.csv`` (refreshing its paired columns when ``reference`` is given).

    Args:
        grid: ``(name, cells)`` to also write ``grids/<name>.md`` and ``.html`` for that grid.
    """
    results_dir = Path(results_dir)
    lb = results_dir / "leaderboard.csv"
    df = refresh_paired(lb, reference) if reference is not None else read_leaderboard(lb)
    results_dir.mkdir(parents=True, exist_ok=True)
    out = {"markdown": _write_text(results_dir / "table6.md", table6_markdown(df))}
    png = plot_leaderboard(df, results_dir / "leaderboard.png")
    if png:
        out["plot"] = png
    out["summary"] = _write_text(results_dir / "summary.md", summary_markdown(df))
    out["summary_html"] = _write_text(results_dir / "summary.html",
                                      summary_html(df, plot="leaderboard.png" if png else None))
    if grid is not None:
        name, cells = grid
        gdir = results_dir / "grids"
        gdir.mkdir(exist_ok=True)
        keys = {(c["method"], c["backbone"], int(c["shots"])) for c in cells}
        gdf = df[[(str(r.method), str(r.backbone), int(r.shots)) in keys for r in df.itertuples()]] if len(df) else df
        title = f"Grid {name}"
        out["grid_summary"] = _write_text(gdir / f"{name}.md", summary_markdown(gdf, title, cells))
        out["grid_summary_html"] = _write_text(gdir / f"{name}.html",
                                               summary_html(gdf, title, plot="../leaderboard.png" if png else None, cells=cells))
    return out
