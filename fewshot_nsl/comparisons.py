"""Paired comparisons on the shared fixed episodes: the leaderboard's paired columns against a
reference method, and ``--compare RUN_A RUN_B`` (statistics from :mod:`fewshot_nsl.stats`), which
refuses two runs of different experiments (:func:`check_comparable`)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from .errors import ConfigError

#: Paired comparison with the reference method (see :func:`add_paired_columns`).
PAIRED = ["ref_method", "ref_backbone", "diff_vs_ref", "diff_ci95", "p_vs_ref", "p_wilcoxon_vs_ref", "n_paired"]
DEFAULT_REFERENCE = "protonet"


def key_text(v: Any) -> str:
    """A key value as text, the same whether it came from a run (``84``, ``None``) or was read
    back from the CSV (``84.0``, ``NaN``)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and float(v).is_integer():
        return str(int(v))
    return str(v)



# ----------------------------------------------------------------------------- paired comparisons
def run_dirs_of(results_dir: Path, run_ids: Any) -> List[Path]:
    """Run folders named by a leaderboard ``run_id`` cell (``;``-separated for several seeds)."""
    if run_ids is None or (isinstance(run_ids, float) and math.isnan(run_ids)):
        return []
    return [Path(results_dir) / "runs" / r for r in str(run_ids).split(";") if r]


def episode_vector(run_dirs: Sequence[Path], n: Optional[int] = None) -> Optional[np.ndarray]:
    """Per-episode accuracy (%) averaged over the given runs (seeds), episodes ``0..n-1`` (``n`` None: the
    first run's summary's count), a failed (non-finite) episode counted as wrong (0), as the leaderboard
    counts it; None when a run's record cannot back it (its folder or ``episodes.csv`` is gone or changed, or
    it lacks one of the episodes: :func:`~fewshot_nsl.episode_log.verified_accuracies`)."""
    from .episode_log import verified_accuracies
    from .errors import DataError

    vectors = []
    for d in run_dirs:
        try:
            vectors.append(verified_accuracies(Path(d), n))
        except DataError:
            return None
        n = len(vectors[0])
    if not vectors:
        return None
    return np.stack(vectors).mean(axis=0)


def _pick_reference(df: pd.DataFrame, i: Any, reference: str) -> Optional[Any]:
    r = df.loc[i]
    cand = df[(df["method"].astype(str) == reference) & (df.index != i)]
    for k in ("dataset", "dataset_fingerprint", "split", "image_size", "ways", "shots", "profile", "episode_hash"):
        cand = cand[cand[k].map(key_text) == key_text(r[k])]
    # the same precision (rows written before the option ran in fp32): a bf16 reference is another experiment
    precision = (lambda v: key_text(v) or "fp32")
    if "precision" in df.columns:
        cand = cand[cand["precision"].map(precision) == precision(r.get("precision"))]
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
    image size, ways, shots, profile, episode hash and precision, preferably with the same backbone. Each side is
    read from its runs' per-episode records, on the row's own episodes, only where they still back their runs'
    summaries (:func:`episode_vector`); where either side's record is gone or changed, the row's paired columns
    are cleared (never left from an earlier computation). ``reference`` None: :data:`DEFAULT_REFERENCE` (``protonet``), as ``--help`` says: a
    ``--reference`` given to one command does not carry over to later commands that did not pass it.
    """
    from .stats import paired_compare

    df = df.copy()
    for c in PAIRED:
        if c not in df.columns:
            df[c] = None
    df[PAIRED] = df[PAIRED].astype(object)
    reference = reference or DEFAULT_REFERENCE
    cache: Dict[str, Optional[np.ndarray]] = {}

    def vector(i: Any) -> Optional[np.ndarray]:
        n = pd.to_numeric(pd.Series([df.at[i, "episodes"] if "episodes" in df.columns else None]), errors="coerce").iloc[0]
        key = f"{df.at[i, 'run_id']}|{n}"
        if key not in cache:
            cache[key] = episode_vector(run_dirs_of(results_dir, df.at[i, "run_id"]), None if pd.isna(n) else int(n))
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
        if a is None or b is None:  # a side without evidence: nothing to pair (never an earlier, stale value)
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


#: What makes two runs different experiments (recorded in ``summary.json`` / ``identity.json``):
#: ``--compare`` refuses to pair them, since the paired test assumes one experiment.
MUST_MATCH = {"dataset_fingerprint": "dataset content", "split": "split", "image_size": "image size",
              "ways": "ways", "shots": "shots"}
#: What two runs compared on purpose may differ in, said in a warning line first.
WARN_IF_DIFFERENT = {"profile": "profile"}


def _run_meta(d: Path) -> Dict[str, Any]:
    """A finished run's ``summary.json``, completed from its ``identity.json`` where a component is
    missing (older summaries)."""
    try:
        meta = json.loads((d / "summary.json").read_text())
    except (OSError, ValueError):
        raise ConfigError(f"run {d} has not finished (no summary.json); finish it before comparing") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"run {d} has an unreadable summary.json; run it again before comparing")
    try:
        identity = json.loads((d / "identity.json").read_text())
    except (OSError, ValueError):
        identity = None
    for source in (meta.get("identity"), identity):
        if isinstance(source, dict):
            for k, v in source.items():
                meta.setdefault(k, v)
    return meta


def check_comparable(da: Path, ma: Dict[str, Any], db: Path, mb: Dict[str, Any]) -> List[str]:
    """Refuse two runs that are different experiments; return the warning lines for the rest.

    The paired test compares two methods episode by episode on *one* experiment. Runs that differ
    in dataset content (fingerprint), split, image size, ways or shots measured different things:
    a difference between them is not the methods' difference, so they are refused (on the same
    episode list the labels and indices line up, which is exactly why the numbers would look
    meaningful). A different profile is a deliberate comparison of methods trained under different
    budgets, and allowed with a warning, as are runs on different numbers of episodes (only the
    common ones are paired) and settings one of the runs did not record.

    Raises:
        ConfigError: one line naming both runs and every setting that differs.
    """
    def text(meta: Dict[str, Any], key: str) -> str:
        return key_text(meta.get(key))

    differ = [f"{what} {text(ma, k) or '?'} vs {text(mb, k) or '?'}" for k, what in MUST_MATCH.items()
              if k in ma and k in mb and text(ma, k) != text(mb, k)]
    if differ:
        raise ConfigError(
            f"runs {da.name} and {db.name} are different experiments ({'; '.join(differ)}); a paired comparison "
            f"needs the same data, split, image size, ways and shots: compare runs of one experiment"
        )
    warnings = [f"warning: runs {da.name} and {db.name} differ in {what} ({text(ma, k)} vs {text(mb, k)}): the "
                f"difference mixes the methods with their training settings"
                for k, what in WARN_IF_DIFFERENT.items() if text(ma, k) != text(mb, k)]
    unknown = [what for k, what in MUST_MATCH.items() if k not in ma or k not in mb]
    if unknown:
        warnings.append(f"warning: {', '.join(unknown)} not recorded by both runs (older run folders); "
                        f"cannot check that they are the same experiment")
    return warnings


def _side(name: str, mean: float, ci: float, n: int, failed: int) -> str:
    note = f"{n} ep" + (f", {failed} failed" if failed else "")
    return f"{name}: {mean:.2f} +- {ci:.2f} ({note})"


def _failed(run_dir: Path, n: int) -> int:
    """Failed (non-finite) episodes among the first ``n`` of a run's ``episodes.csv``."""
    from .evaluation import read_episode_results

    rows = read_episode_results(run_dir / "episodes.csv")
    return sum(1 for i in range(n) if i in rows and rows[i].get("status") != "ok")


def compare_stats(a: str, b: str, results_dir: Path) -> Dict[str, Any]:
    """Paired statistics of two finished runs on their common episodes.

    Returns:
        ``run_a``, ``run_b``, ``method_a``, ``method_b``, ``backbone_a``, ``backbone_b``, ``seed_a``,
        ``seed_b``, ``episode_hash``, ``dataset``, ``ways``, ``shots``, ``n_paired``, ``accuracy_a``,
        ``ci95_a``, ``failed_a``, ``accuracy_b``, ``ci95_b``, ``failed_b``, ``diff`` (A - B, accuracy
        points), ``diff_ci95``, ``t_stat``, ``p_value`` (paired t-test), ``p_wilcoxon``, ``episodes_a``,
        ``episodes_b``, ``n_a``, ``n_b`` (episodes summarised), ``code_a``, ``code_b`` (the runs' code hashes) and ``warnings`` (a list of ``warning: ...`` lines, :func:`check_comparable`).

    Raises:
        ConfigError: a run is missing or unfinished, the two used different episode lists, or
            they are different experiments (:func:`check_comparable`).
    """
    from .episode_log import verified_accuracies
    from .stats import paired_compare, summarize

    da, db = resolve_run(a, results_dir), resolve_run(b, results_dir)
    ma, mb = _run_meta(da), _run_meta(db)
    if ma.get("episode_hash") != mb.get("episode_hash"):
        raise ConfigError(
            f"runs {da.name} and {db.name} were evaluated on different episode lists "
            f"({ma.get('episode_hash')} vs {mb.get('episode_hash')}); a paired comparison needs the same episodes"
        )
    warnings = check_comparable(da, ma, db, mb)
    va, vb = verified_accuracies(da), verified_accuracies(db)  # DataError: a record that no longer backs its run
    n = min(len(va), len(vb))
    if len(va) != len(vb):
        warnings.append(f"warning: A has {len(va)} episodes and B {len(vb)}; only the first {n} are paired")
    pc = paired_compare(va[:n], vb[:n])
    sa, sb = summarize(va[:n]), summarize(vb[:n])
    return {
        "run_a": da.name, "run_b": db.name, "method_a": ma.get("method"), "method_b": mb.get("method"),
        "backbone_a": ma.get("backbone"), "backbone_b": mb.get("backbone"), "seed_a": ma.get("seed"),
        "seed_b": mb.get("seed"), "episode_hash": ma.get("episode_hash"), "dataset": ma.get("dataset"),
        "ways": ma.get("ways"), "shots": ma.get("shots"), "n_paired": pc.n,
        "accuracy_a": sa.mean, "ci95_a": sa.ci95, "failed_a": _failed(da, n), "n_a": sa.n,
        "accuracy_b": sb.mean, "ci95_b": sb.ci95, "failed_b": _failed(db, n), "n_b": sb.n,
        "diff": pc.mean_diff, "diff_ci95": pc.ci95, "t_stat": pc.t_stat, "p_value": pc.p_value,
        "p_wilcoxon": pc.wilcoxon_p, "episodes_a": len(va), "episodes_b": len(vb), "warnings": warnings,
        "code_a": ma.get("code_hash"), "code_b": mb.get("code_hash"),
    }


def compare_runs(a: str, b: str, results_dir: Path) -> str:
    """Paired comparison of two finished runs on their common episodes (:func:`compare_stats`), as
    printable text; any warning (:func:`check_comparable`) comes first, as ``warning: ...`` lines.

    Raises:
        ConfigError: as :func:`compare_stats`.
    """
    s = compare_stats(a, b, results_dir)
    sig = "significant" if s["p_value"] < 0.05 else "not significant"
    # two versions of one method (an edited plugin) read alike but for their code: say which code each ran
    versions = s["method_a"] == s["method_b"] and s["code_a"] != s["code_b"]
    code = (lambda c: f", code {str(c)[:8]}") if versions else (lambda c: "")
    return "\n".join(list(s["warnings"]) + [
        f"A: {s['run_a']}  ({s['method_a']} {s['backbone_a']}, seed {s['seed_a']}{code(s['code_a'])})",
        f"B: {s['run_b']}  ({s['method_b']} {s['backbone_b']}, seed {s['seed_b']}{code(s['code_b'])})",
        f"episodes: {s['n_paired']} paired (episode list {s['episode_hash']}, {s['ways']}-way {s['shots']}-shot, "
        f"{s['dataset']})",
        f"{_side('A', s['accuracy_a'], s['ci95_a'], s['n_a'], s['failed_a'])}   "
        f"{_side('B', s['accuracy_b'], s['ci95_b'], s['n_b'], s['failed_b'])}   (mean accuracy %, 95% CI)",
        f"A - B: {s['diff']:+.2f} +- {s['diff_ci95']:.2f} points (95% CI of the paired difference)",
        f"paired t-test: t = {s['t_stat']:.3f}, p = {s['p_value']:.4g}; Wilcoxon signed-rank p = {s['p_wilcoxon']:.4g} "
        f"({sig} at 0.05)",
    ])
