"""Paired table of the issue-13 ablations (docs/protocols.md): each variant against its reference arm
on the same fixed test episodes, with :func:`fewshot_nsl.stats.paired_compare`.

Each ablation ran with ``--results-dir ABL/<name>`` (one run per folder; configs in
``configs/ablations/<name>.yaml``). A reference arm may also be a committed run folder.

    .venv/bin/python benchmarks/ablation_table.py ABL   # ABL: the folder holding one --results-dir per variant
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fewshot_nsl.runner import episode_accuracies  # noqa: E402
from fewshot_nsl.stats import paired_compare, summarize  # noqa: E402

#: (variant, reference arm, what the variant changes)
PAIRS = [
    ("dyn5_width64", "dyn5_base", "predictor width 64 (authors' DNS) vs 16"),
    ("dyn5_pred_eps1e-5", "dyn5_base", "predictor BN eps 1e-5 vs 1e-3"),
    ("dyn5_backbone_eps1e-3", "dyn5_base", "backbone BN eps 1e-3 (authors) vs 1e-5"),
    ("dyn5_gate_off", "dyn5_base", "no tanh gate on the residual vs gate"),
    ("dyn5_uns", "dyn5_base", "UNS vs DNS"),
    ("dyn5_shared", "dyn5_base", "shared vs disjoint predictors"),
    ("dyn5_pretrain48", "dyn5_base", "48 vs 24 pretraining epochs"),
    ("meta5_m_only", "meta5_m_and_head", "5-shot: inner loop adapts only M_s vs M_s and head"),
    ("meta1_m_only", "meta1_m_and_head", "1-shot: inner loop adapts only M_s vs M_s and head"),
    ("dyn5_base", "protonet5_ref", "dynamic NSN (reference arm) vs ProtoNet (quick reference)"),
]

#: reruns against the committed quick runs (how far two identical configurations drift), and the
#: dynamic NSN variants that moved it against ProtoNet's committed quick run
_RERUN = "rerun of the committed quick run (identity check)"
CHECKS = [
    ("meta5_m_and_head", "meta5_m_and_head_ref", _RERUN),
    ("meta1_m_and_head", "meta1_m_and_head_ref", _RERUN),
    ("dyn5_base", "dyn5_ref", _RERUN),
    ("meta5_m_only", "meta5_m_and_head_ref", "5-shot M only vs the committed M+head run"),
    ("meta1_m_only", "meta1_m_and_head_ref", "1-shot M only vs the committed M+head run"),
    ("dyn5_gate_off", "protonet5_ref", "dynamic NSN without the gate vs ProtoNet (quick reference)"),
    ("dyn5_pretrain48", "protonet5_ref", "dynamic NSN, 48 pretraining epochs, vs ProtoNet (quick reference)"),
]

#: committed reference runs usable as arms (quick profile, seed 0)
REFERENCE = ROOT / "results" / "reference" / "glyphs_quick_2026-12-04" / "runs"  # the runs the ablation compared
COMMITTED = {
    "meta5_m_and_head_ref": "glyphs_meta_static_nsn_cnn4_5w5s_quick_seed0_1d54b695",
    "meta1_m_and_head_ref": "glyphs_meta_static_nsn_cnn4_5w1s_quick_seed0_1cea207f",
    "dyn5_ref": "glyphs_dynamic_nsn_cnn4_5w5s_quick_seed0_4aeee5a0",
    "protonet5_ref": "glyphs_protonet_cnn4_5w5s_quick_seed0_d9e46d16",
}


def run_dir(abl: Path, name: str):
    if name in COMMITTED:
        return REFERENCE / COMMITTED[name]
    runs = sorted((abl / name / "runs").glob("*")) if (abl / name / "runs").is_dir() else []
    done = [r for r in runs if (r / "summary.json").is_file()]
    return done[0] if done else None


def main(abl: Path) -> None:
    print("| variant | vs | change | variant acc | reference acc | paired diff (95% CI) | paired t p | Wilcoxon p | n |")
    print("|---|---|---|---|---|---|---|---|---|")
    for a, b, what in PAIRS + CHECKS:
        da, db = run_dir(abl, a), run_dir(abl, b)
        if da is None or db is None:
            continue
        va, vb = episode_accuracies(da), episode_accuracies(db)
        n = min(len(va), len(vb))
        pc = paired_compare(va[:n], vb[:n])
        sa, sb = summarize(va[:n]), summarize(vb[:n])
        print(f"| {a} | {b} | {what} | {sa.mean:.2f} ± {sa.ci95:.2f} | {sb.mean:.2f} ± {sb.ci95:.2f} | "
              f"{pc.mean_diff:+.2f} ± {pc.ci95:.2f} | {pc.p_value:.3g} | {pc.wilcoxon_p:.3g} | {pc.n} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "ablation_results"))
