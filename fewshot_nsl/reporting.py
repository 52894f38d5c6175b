"""Table-6-style markdown, summaries (markdown, HTML) and a plot, rendered from ``leaderboard.csv``.

The CSV itself is :mod:`fewshot_nsl.leaderboard`, the paired columns :mod:`fewshot_nsl.comparisons`;
their names are re-exported here for existing callers.

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

Names are data: whatever a CSV cell holds (a method name from another tool's leaderboard, a ``|``,
a newline, a backtick, ``$...$``) is written so that it cannot change the document around it:
Markdown cells through :func:`md_cell` (backslash escapes, control characters shown as ``\\n``),
HTML through :func:`html.escape`, plot text with matplotlib's math parsing off (:data:`PLAIN_TEXT_RC`).
Every table shows each row's own episode count and failed-episode count (``(600 ep, 3 failed)``).
"""
from __future__ import annotations

import html
import re
import unicodedata
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pandas as pd

from .comparisons import (  # noqa: F401  (re-exported)
    DEFAULT_REFERENCE,
    PAIRED,
    add_paired_columns,
    compare_runs,
    episode_vector,
    key_text,
    resolve_run,
    run_dirs_of,
)
from .leaderboard import (  # noqa: F401  (re-exported)
    COLUMNS,
    GROUP,
    KEY,
    KNOWN_COLUMNS,
    LEGACY_KEY,
    TEXT_COLUMNS,
    check_leaderboard,
    paper_comparable,
    paper_only_rows,
    paper_rows,
    paper_value,
    read_leaderboard,
    refresh_paired,
    upsert_row,
)
from .safe_io import atomic_write, atomic_write_text, locked


# ----------------------------------------------------------------------------- escaping
#: Characters that change Markdown around them (emphasis, code, links, table cells, math, strikethrough).
_MD_SPECIAL = frozenset("\\`*[]|$~")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_MD_CODE_SAFE = re.compile(r"[A-Za-z0-9_.+\- ]+")
#: matplotlib settings under which text is drawn verbatim (no ``$...$`` mathtext, no LaTeX).
PLAIN_TEXT_RC = {"text.usetex": False, "text.parse_math": False}


def _is_invisible(ch: str) -> bool:
    """Control, format (bidi overrides, zero-width) and line/paragraph separator characters."""
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")


def _escape_code(ch: str) -> str:
    """``\\n`` or ``\\x1b`` / ``\\u202e`` (as text) for an invisible character."""
    return _SHORT_ESCAPES.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def visible(value: Any) -> str:
    """``str(value)`` with invisible characters written as escapes (a newline as ``\\n``), so a
    value is always one line and shows what it holds (for HTML, plots and console lines)."""
    return "".join(_escape_code(ch) if _is_invisible(ch) else ch for ch in str(value))


def md_cell(value: Any) -> str:
    """``value`` as inline Markdown text that renders as itself and cannot leave its table cell.

    ASCII punctuation that Markdown acts on (``\\ ` * _ [ ] | $ ~``, ``<`` before a tag and ``&``
    before an entity) is backslash-escaped; invisible characters become visible escapes (:func:`visible`)."""
    text = str(value)
    out = []
    for i, ch in enumerate(text):
        nxt = text[i + 1:i + 2]
        if _is_invisible(ch):
            out.append("\\" + _escape_code(ch))
        elif ch == "_" and (i == 0 or i == len(text) - 1 or not (text[i - 1].isalnum() and nxt.isalnum())):
            out.append("\\_")  # intraword '_' (static_nsn) never emphasises: left as is
        elif ch in _MD_SPECIAL:
            out.append("\\" + ch)
        elif ch == "<" and re.match(r"[A-Za-z/!?]", nxt):
            out.append("\\<")
        elif ch == "&" and re.match(r"#?\w+;", text[i + 1:]):
            out.append("\\&")
        else:
            out.append(ch)
    return "".join(out)


def md_code(value: Any) -> str:
    """``value`` as a Markdown code span when it is plain (letters, digits, ``_ . + -``, spaces),
    else as escaped text (a code span cannot escape a backtick or a pipe reliably)."""
    text = str(value)
    return f"`{text}`" if _MD_CODE_SAFE.fullmatch(text) else md_cell(text)


def _md_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(md_cell(c) for c in cells) + " |"


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
    n_paired, n = _count(r.get("n_paired")), _count(r.get("episodes"))  # fewer: the reference has fewer episodes
    paired = f", on {n_paired} paired ep" if n_paired is not None and n is not None and n_paired < n else ""
    return f"{float(d):+.2f} ± {float(r['diff_ci95']):.2f} ({_fmt_p(r.get('p_vs_ref'))}{other}{paired})"


def n_seeds_of(r: Any) -> int:
    n = r.get("n_seeds")
    return 1 if n is None or pd.isna(n) else int(n)


def _count(v: Any) -> Optional[int]:
    """An integer cell (``600``, ``600.0``, ``"600"``), None when empty or not a number."""
    v = pd.to_numeric(pd.Series([v]), errors="coerce").iloc[0]
    return None if pd.isna(v) else int(v)


def episodes_note(r: Any) -> str:
    """The row's own episode count and failed-episode count: ``(600 ep)``, ``(597 ep, 3 failed)``,
    ``(episodes unknown)`` for a row without the column."""
    n, failed = _count(r.get("episodes")), _count(r.get("episodes_failed"))
    text = "episodes unknown" if n is None else f"{n} ep"
    if failed:
        text += f", {failed} failed"
    return f"({text})"


#: Column :func:`render_reports` adds (not to ``leaderboard.csv``): why a row's runs do not back it, empty when they do.
UNVERIFIED = "unverified"
#: Marker after the accuracy of a row whose runs do not back it (explained under the title).
UNVERIFIED_MARK = " ⚠ unverified"


def _unverified(r: Any) -> bool:
    v = r.get(UNVERIFIED)
    return isinstance(v, str) and bool(v)


def _acc_cell(r: pd.Series) -> str:
    cell = f"{_fmt(r['accuracy'], r['ci95'])} {episodes_note(r)}" + (UNVERIFIED_MARK if _unverified(r) else "")
    if _is_true(r.get("transductive")):
        cell += " †"  # transductive: explained under the table
    ss = r.get("seed_std")
    if ss is not None and pd.notna(ss) and n_seeds_of(r) > 1:
        cell += f" (seed sd {float(ss):.2f})"
    return cell


def _groups(df: pd.DataFrame):
    """Tables of rows on the same data (name and content), split, ways, profile and image size."""
    df = df.copy()
    for c in GROUP:
        df[c] = df[c].map(key_text) if c in df.columns else ""
    return df.groupby(GROUP, sort=True)


def _group_title(key: Tuple, markdown: bool = True) -> str:
    """``glyphs (data 1a2b3c4d), test split, 5-way, profile `quick`, 84 px``: Markdown (every value
    escaped), or plain text (``markdown=False``: invisible characters shown, no backticks)."""
    dataset, fingerprint, split, ways, profile, image_size, precision = key
    text, code = (md_cell, md_code) if markdown else (visible, visible)
    px = f", {text(image_size)} px" if image_size else ""
    prec = f", {text(precision)}" if precision and str(precision) not in ("fp32", "nan", "None") else ""
    return (f"{text(dataset)} (data {text(str(fingerprint)[:8])}), {text(split)} split, {text(ways)}-way, "
            f"profile {code(profile)}{px}{prec}")


def _is_true(v: Any) -> bool:
    return str(v) in ("True", "true", "1", "1.0")


def _ref_name(g: pd.DataFrame) -> str:
    refs = g["ref_method"].dropna().astype(str) if "ref_method" in g else pd.Series(dtype=str)
    return refs.mode().iloc[0] if len(refs) else DEFAULT_REFERENCE


def table6_markdown(df: pd.DataFrame, notes: Sequence[str] = ()) -> str:
    """Table-6-style markdown: one table per (dataset and its content, split, ways, profile, image
    size), shots as columns, with the paired difference to the reference method per shot. The
    paper's value is a column only where the table is comparable with it (:func:`paper_comparable`);
    elsewhere it is given for orientation, with the reason.

    Args:
        notes: lines (Markdown) said under the title, e.g. which rows a filtered report left out.
    """
    if df.empty:
        return "# Results\n\n" + "".join(f"{n}\n\n" for n in notes) + "No results yet.\n"
    out = ["# Few-shot results (Table-6 style)", ""]
    for note in notes:
        out += [note, ""]
    out.append(
        "Mean accuracy (%) ± 95% CI (1.96·std/√n over the fixed test episodes; with several training "
        "seeds, over the seed-averaged episodes, and `seed sd` is the std of the per-seed means). "
        "`Δ vs <ref>`: paired difference to the reference method on the same episodes ± its 95% CI, "
        "with the paired t-test p-value. `paper` is the NSL paper's Table 6 value on Mini-ImageNet "
        "(5-way 5-shot; the paper reports no 1-shot values), shown as a column only for Mini-ImageNet test "
        "rows of the `paper` profile at 84 px; elsewhere it is marked *for orientation*. "
        "`(n ep, k failed)` after each value: the episodes that row was measured on (`episodes`) and, where "
        "any, how many of its episodes failed (`episodes_failed`: the method raised or gave non-finite logits). "
        "`†`: a transductive row (`transductive`): a query's prediction depends on the other queries of its "
        "episode (BN normalising the query batch with its own statistics at test, as Finn et al.'s MAML and "
        "Sung et al.'s RelationNet test scripts do), an advantage inductive rows do not have."
    )
    out.append("")
    for key, g in _groups(df):
        dataset, _, split, ways, profile, image_size, _precision = key
        synthetic = _synthetic(g)
        comparable, why = paper_comparable(dataset, profile, image_size, split)
        ref = _ref_name(g)
        out.append(f"## {_group_title(key)}")
        out.append("")
        if synthetic:
            out.append(
                f"*{md_cell(dataset)} is synthetic; its numbers are NOT comparable with the paper's Mini-ImageNet "
                "values, which are shown for orientation only.*"
            )
            out.append("")
        elif not comparable:
            out.append(f"*Not comparable with the paper's Table 6 ({md_cell(why)}); its values are shown for "
                       "orientation only.*")
            out.append("")
        shots = sorted(int(s) for s in g["shots"].unique())
        paper_col = "paper (5-shot)" if comparable else "paper (5-shot, for orientation)"
        header = (["Method", "Backbone"] + [f"{s}-shot" for s in shots] + [f"Δ vs {ref} ({s}-shot)" for s in shots]
                  + [paper_col, "seeds", "params"])
        out.append(_md_row(header))
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
            params = pd.to_numeric(m["params"], errors="coerce").max()
            cells.append(f"{int(params):,}" if pd.notna(params) else "-")
            out.append(_md_row(cells))
        out.append("")
    others = paper_only_rows()
    if others:
        out.append("Other rows of the paper's Table 6 (backbones this suite does not implement): "
                   + "; ".join(f"{r['label']} ({r['backbone']}) {_fmt(r['paper'], r['paper_ci'])}" for r in others)
                   + ".")
        out.append("")
    return "\n".join(out)


def _synthetic(g: pd.DataFrame) -> bool:
    return bool(g["synthetic"].fillna(False).astype(str).isin(["True", "true", "1"]).any()) if "synthetic" in g else False


def _summary_frame(g: pd.DataFrame) -> pd.DataFrame:
    """The per-row table of the run summary (raw values as strings; escaped by the renderer)."""
    def num(v: Any, fmt: str) -> str:
        return "-" if v is None or pd.isna(v) else format(float(v), fmt)

    rows = []
    for _, r in g.sort_values(["shots", "method", "backbone"]).iterrows():
        commit = "" if pd.isna(r.get("git_commit")) or not r.get("git_commit") else str(r.get("git_commit"))
        if not commit and pd.notna(r.get("version")) and r.get("version"):  # an installed copy: its version
            commit = f"v{r.get('version')}"
        episodes, failed = _count(r.get("episodes")), _count(r.get("episodes_failed")) or 0
        rows.append({
            "method": r["method"], "backbone": r["backbone"], "shots": int(r["shots"]), "split": r.get("split"),
            "accuracy ± CI95": _fmt(r["accuracy"], r["ci95"]) + (f" ({failed} failed)" if failed else "")
            + (UNVERIFIED_MARK if _unverified(r) else ""),
            "t-CI95": num(r.get("ci95_t"), ".2f"),
            "seed sd": num(r.get("seed_std"), ".2f"), "seeds": r.get("seeds"),
            "Δ vs ref": _fmt_diff(r), "Wilcoxon p": _fmt_p(r.get("p_wilcoxon_vs_ref")) or "-",
            "paper": _fmt(r.get("paper_value"), r.get("paper_ci")) + (
                "" if _is_true(r.get("paper_comparable")) or pd.isna(r.get("paper_value")) else " (orientation)"),
            "episodes": "-" if episodes is None else episodes, "failed": failed,
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
    out = [_md_row(t.columns), "|" + "---|" * len(t.columns)]
    for _, r in t.iterrows():
        out.append(_md_row(r.values))
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
                   f"{wall / 60:.1f} min of run time, reference {md_code(_ref_name(g))}")
        out.append("")
        out += _md_table(_summary_frame(g))
        out.append("")
        if cells:
            have = {(str(r.method), str(r.backbone), int(r.shots)) for r in g.itertuples()}
            missing = [c for c in cells if (c["method"], c["backbone"], int(c["shots"])) not in have]
            if missing:
                out.append("Grid cells without a result: " + ", ".join(
                    md_cell(f"{c['method']} {c['backbone']} {c['shots']}-shot") for c in missing) + ".")
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
        syn = " (synthetic: not comparable with Mini-ImageNet)" if _synthetic(g) else ""
        parts.append(f"<h2>{html.escape(_group_title(key, markdown=False))}{syn}</h2>")
        parts.append(_summary_frame(g).apply(lambda col: col.map(visible)).to_html(index=False, escape=True))
        if cells:
            have = {(str(r.method), str(r.backbone), int(r.shots)) for r in g.itertuples()}
            missing = [c for c in cells if (c["method"], c["backbone"], int(c["shots"])) not in have]
            if missing:
                parts.append("<p>Grid cells without a result: " + html.escape(", ".join(
                    visible(f"{c['method']} {c['backbone']} {c['shots']}-shot") for c in missing)) + "</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- plot
#: Method families of the built-in methods (one plot colour each); a plugin may name its own with a
#: ``family`` class attribute, else it is ``other``.
FAMILIES = {
    "static_nsn": "NSL", "dynamic_nsn": "NSL", "meta_static_nsn": "NSL",
    "protonet": "metric", "matchingnet": "metric", "relationnet": "metric", "nearest_neighbor": "metric",
    "maml": "gradient-based", "meta_sgd": "gradient-based",
    "finetune": "fine-tuning",
}
#: One colour per family (colour-blind-safe tableau hues).
FAMILY_COLOURS = {"NSL": "#c44e52", "metric": "#4c72b0", "gradient-based": "#55a868", "fine-tuning": "#8172b2",
                  "other": "#937860"}


def method_family(method: Any) -> str:
    """The family of a method name (:data:`FAMILIES`, a registered class's ``family`` attribute, else ``other``)."""
    name = str(method)
    if name in FAMILIES:
        return FAMILIES[name]
    try:
        from .registry import METHODS

        cls = METHODS.get(name) if name in METHODS else None
    except Exception:  # noqa: BLE001 - a report renders from the CSV alone
        cls = None
    family = getattr(cls, "family", None)
    return str(family) if isinstance(family, str) and family in FAMILY_COLOURS else "other"


def plot_leaderboard(df: pd.DataFrame, path: Path) -> Optional[Path]:
    """Horizontal bars of accuracy with 95% CI error bars, one bar per (method, backbone, shots), one
    panel per table (:func:`_groups`), each panel as tall as its rows; one colour per method family
    (:func:`method_family`); paper value marked; a row with failed episodes says how many in its label.
    Text is drawn verbatim (:data:`PLAIN_TEXT_RC`: a ``$`` in a name is a dollar sign, not mathtext)."""
    if df.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    with matplotlib.rc_context(PLAIN_TEXT_RC):
        return _plot_leaderboard(df, Path(path))


def _plot_leaderboard(df: pd.DataFrame, path: Path) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    groups = list(_groups(df))
    heights = [0.32 * len(g) + 1.3 for _, g in groups]  # inches: every bar row as tall in every panel
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, sum(heights) + 0.4), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (key, g) in zip(axes[:, 0], groups):
        dataset, _, split, ways, profile, image_size, _precision = key
        comparable, _ = paper_comparable(dataset, profile, image_size, split)
        g = g.assign(shots=g["shots"].astype(int)).sort_values(["shots", "accuracy"])
        labels = [visible(f"{r.method} ({r.backbone}, {int(r.shots)}-shot"
                          + (f", {_count(r.episodes_failed)} failed" if _count(getattr(r, "episodes_failed", None))
                             else "") + ")") for r in g.itertuples()]
        y = list(range(len(g)))
        families = [method_family(m) for m in g["method"]]
        ax.barh(y, g["accuracy"].astype(float), height=0.7, color=[FAMILY_COLOURS[f] for f in families])
        ax.errorbar(g["accuracy"].astype(float), y, xerr=g["ci95"].astype(float), fmt="none", ecolor="black",
                    elinewidth=1, capsize=3)
        handles = [Patch(color=FAMILY_COLOURS[f], label=f) for f in dict.fromkeys(families)]
        handles.append(plt.Line2D([], [], color="black", marker="|", linestyle="-", label="95% CI"))
        for yi, r in zip(y, g.itertuples()):
            pv, _ = paper_value(r.method, r.backbone, int(r.ways), int(r.shots))
            if pv is not None:
                ax.plot([pv], [yi], marker="D" if comparable else "d", color="#dd8452" if comparable else "#bbbbbb",
                        markeredgecolor="black", linestyle="none")
        if any(paper_value(r.method, r.backbone, int(r.ways), int(r.shots))[0] is not None for r in g.itertuples()):
            handles.append(plt.Line2D([], [], marker="D" if comparable else "d", linestyle="none",
                                      color="#dd8452" if comparable else "#bbbbbb", markeredgecolor="black",
                                      label="paper (Mini-ImageNet)" if comparable
                                      else "paper (Mini-ImageNet, for orientation)"))
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_ylim(-0.6, len(g) - 0.4)
        ax.axvline(100.0 / int(ways), color="grey", linestyle=":")
        handles.append(plt.Line2D([], [], color="grey", linestyle=":", label="chance"))
        ax.set_xlim(0, 100)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel("accuracy (%) with 95% CI")
        syn = " (synthetic)" if _synthetic(g) else ""
        ax.set_title(f"{_group_title(key, markdown=False)}{syn}", fontsize=9)
        ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    try:
        atomic_write(Path(path), lambda f: fig.savefig(f, dpi=110, format="png", bbox_inches="tight"), binary=True)
    finally:
        plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- LaTeX
_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}


def latex_escape(value: Any) -> str:
    """``value`` as LaTeX text that typesets as itself (``static_nsn`` -> ``static\\_nsn``, ``$`` -> ``\\$``;
    invisible characters shown as escapes, :func:`visible`)."""
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in visible(value))


def _latex_acc(r: pd.Series) -> str:
    if r.get("accuracy") is None or pd.isna(r.get("accuracy")):
        return "--"
    cell = f"${float(r['accuracy']):.2f} \\pm {float(r['ci95']):.2f}$"
    cell += "$^\\dagger$" if _is_true(r.get("transductive")) else ""
    return cell + (" (unverified)" if _unverified(r) else "")  # runs that no longer back the row (verify_rows)


def table6_latex(df: pd.DataFrame) -> str:
    """The tables of :func:`table6_markdown` as LaTeX ``booktabs`` tables (``\\usepackage{booktabs}``):
    one ``table`` per (dataset, split, ways, profile, image size), methods as rows, shots as columns,
    mean accuracy (%) ± 95% CI, and the paper's 5-shot value where it has one. Every name is escaped
    (:func:`latex_escape`)."""
    out = ["% fewshot-nsl Table-6-style results; needs \\usepackage{booktabs}", ""]
    if df.empty:
        return "\n".join(out + ["% no results yet", ""])
    for key, g in _groups(df):
        dataset, _, split, ways, profile, image_size, _precision = key
        comparable, _ = paper_comparable(dataset, profile, image_size, split)
        shots = sorted(int(s) for s in g["shots"].unique())
        note = "" if comparable else " The paper column is for orientation only (not the paper's protocol)."
        if _synthetic(g):
            note += " Synthetic data: not comparable with Mini-ImageNet."
        out += ["\\begin{table}[t]", "\\centering",
                f"\\caption{{{latex_escape(_group_title(key, markdown=False))}: mean accuracy (\\%) $\\pm$ 95\\% CI "
                f"over the fixed test episodes.{note}}}",
                "\\begin{tabular}{ll" + "r" * (len(shots) + 1) + "}", "\\toprule",
                " & ".join(["Method", "Backbone"] + [f"{s}-shot" for s in shots] + ["Paper (5-shot)"]) + " \\\\",
                "\\midrule"]
        for (method, backbone), m in g.groupby(["method", "backbone"], sort=False):
            cells = [latex_escape(method), latex_escape(backbone)]
            for s in shots:
                r = m[m["shots"].astype(int) == s]
                cells.append("; ".join(_latex_acc(x) for _, x in r.iterrows()) if len(r) else "--")
            pv, pc = paper_value(str(method), str(backbone), int(ways), 5)
            cells.append("--" if pv is None else f"${float(pv):.2f} \\pm {float(pc):.2f}$")
            out.append(" & ".join(cells) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    if "transductive" in df and df["transductive"].map(_is_true).any():
        out += ["% $^\\dagger$: transductive (the query batch's own BN statistics at test)", ""]
    return "\n".join(out)


def _write_text(path: Path, text: str) -> Path:
    return atomic_write_text(path, text)


#: Report formats (``--format``): the Markdown tables always, LaTeX beside them when asked.
FORMATS = ("markdown", "latex")


def report_rows(df: pd.DataFrame, where: Optional[Dict[str, Sequence[Any]]] = None,
                include_smoke: Optional[bool] = None) -> Tuple[pd.DataFrame, pd.DataFrame, List[str]]:
    """The rows a report shows: those matching ``where`` (column -> accepted values, e.g.
    ``{"profile": ["quick"], "method": ["protonet"]}``, :func:`~fewshot_nsl.leaderboard.select_rows`).

    Returns:
        ``(selected, tables, notes)``: the matching rows (for the summaries), the rows of
        ``table6.md`` and the plot (the selected rows without the smoke-profile ones, whose numbers
        are meaningless, unless ``include_smoke``, the ``profile`` filter names smoke, or every
        selected row is a smoke row), and Markdown lines saying what was left out.
    """
    from .leaderboard import select_rows

    notes: List[str] = []
    selected = df[select_rows(df, where)] if len(df) and where else df
    if len(df) and where:
        shown = "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in where.items() if v is not None)
        notes.append(f"*Filtered report ({md_cell(shown)}): {len(selected)} of {len(df)} leaderboard rows.*")
    asked = include_smoke or "smoke" in [str(p) for p in (where or {}).get("profile") or []]
    smoke = selected["profile"].map(key_text) == "smoke" if len(selected) else pd.Series(dtype=bool)
    if asked or not len(selected) or bool(smoke.all()) or not smoke.any():
        return selected, selected, notes
    notes.append(f"*{int(smoke.sum())} smoke-profile row(s) left out: their numbers are meaningless (the smoke "
                 "profile only checks that everything runs); `--report --include-smoke` or `--report --profile smoke` "
                 "shows them.*")
    return selected, selected[~smoke], notes


def verify_rows(df: pd.DataFrame, results_dir: Path, log: Optional[Callable[[str], None]] = None
                ) -> Tuple[pd.DataFrame, List[str]]:
    """``df`` with the :data:`UNVERIFIED` column (:func:`~fewshot_nsl.leaderboard.row_evidence_problem` of each
    row, empty where its runs back it), and the Markdown notes that explain the marked rows; ``log`` gets one
    ``warning:`` line per marked row."""
    from .leaderboard import row_evidence_problem

    df = df.copy()
    problems = [row_evidence_problem(r.to_dict(), results_dir) or "" for _, r in df.iterrows()]
    df[UNVERIFIED] = problems
    notes = []
    for (_, r), problem in zip(df.iterrows(), problems):
        if not problem:
            continue
        what = f"{r.get('method')} {r.get('backbone')} {r.get('ways')}-way {r.get('shots')}-shot ({r.get('profile')}, {r.get('dataset')})"
        if log is not None:
            log(f"warning: leaderboard row {what} is not backed by its runs: {problem}; run its command again "
                f"(or --forget the row)")
        notes.append(f"*⚠ unverified: {md_cell(what)}: {md_cell(problem)}. Its accuracy is shown as the row says; "
                     "its paired columns are left empty. Run its command again, or `--forget` the row.*")
    return df, notes


def render_reports(results_dir: Path, reference: Optional[str] = None,
                   grid: Optional[Tuple[str, Sequence[Dict[str, Any]]]] = None,
                   where: Optional[Dict[str, Sequence[Any]]] = None, include_smoke: Optional[bool] = None,
                   formats: Sequence[str] = ("markdown",), log: Optional[Callable[[str], None]] = None) -> Dict[str, Path]:
    """Regenerate ``table6.md``, ``leaderboard.png``, ``summary.md`` and ``summary.html`` (and
    ``table6.tex`` with ``"latex"`` in ``formats``) from ``leaderboard.csv``, refreshing its paired
    columns against ``reference`` (default ``protonet``, whatever an earlier command passed).

    Args:
        grid: ``(name, cells)`` to also write ``grids/<name>.md`` and ``.html`` for that grid.
        where: filters of the rows shown (:func:`report_rows`); the CSV keeps every row.
        include_smoke: show smoke-profile rows in ``table6.md`` and the plot (see :func:`report_rows`).
        formats: ``markdown`` (always written) and ``latex`` (:func:`table6_latex`).
        log: where to say which rows their runs no longer back (:func:`verify_rows`; they are also marked
            in the reports).
    """
    results_dir = Path(results_dir)
    # one render at a time, from reading the leaderboard to the last file: two commands finishing together
    # (each upserting its row, then rendering) leave the reports of the newer leaderboard, not of an older view
    with locked(results_dir / "reports"):
        return _render_reports(results_dir, reference, grid, where, include_smoke, formats, log)


def _render_reports(results_dir, reference, grid, where, include_smoke, formats, log) -> Dict[str, Path]:
    """:func:`render_reports` under its lock."""
    lb = results_dir / "leaderboard.csv"
    df = refresh_paired(lb, reference) if lb.is_file() else read_leaderboard(lb)
    selected, tables, notes = report_rows(df, where, include_smoke)
    selected, evidence_notes = verify_rows(selected, results_dir, log)
    tables = selected.loc[tables.index] if len(tables) else selected.iloc[0:0]
    notes = notes + evidence_notes
    results_dir.mkdir(parents=True, exist_ok=True)
    out = {"markdown": _write_text(results_dir / "table6.md", table6_markdown(tables, notes))}
    if "latex" in formats:
        out["latex"] = _write_text(results_dir / "table6.tex", table6_latex(tables))
    png = plot_leaderboard(tables, results_dir / "leaderboard.png")
    if png:
        out["plot"] = png
    out["summary"] = _write_text(results_dir / "summary.md", summary_markdown(selected))
    out["summary_html"] = _write_text(results_dir / "summary.html",
                                      summary_html(selected, plot="leaderboard.png" if png else None))
    df = selected
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
