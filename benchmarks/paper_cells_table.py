"""Markdown table of benchmarks/paper_cells.py's JSON (docs/protocols.md)."""
import json
import sys
from pathlib import Path

path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("paper_cells.json"))
cells = sorted(json.loads(path.read_text()).values(), key=lambda c: c["cell"])
print("| cell | stages | end-to-end (cut) | pretrain step s (cpu) | episodic step s (cpu) | test episode s (cpu) | "
      "peak MiB (phase growth) | full budget: steps | projected full h, wall (cpu) |")
print("|---|---|---|---|---|---|---|---|---|")
for c in cells:
    name = f"{c['method']} {c['backbone']} {c['shots']}-shot"
    if "error" in c:
        print(f"| {name} | error: {' '.join(c['error'])} |||||||")
        continue
    cpu = c.get("cpu_s", {})

    def fmt(key, ck):
        return f"{c[key]:.2f} ({cpu[ck]:.2f})" if key in c else "-"

    steps = []
    if "pretrain_steps_full" in c:
        steps.append(f"{c['pretrain_steps_full']} pre")
    if "episodic_steps_full" in c:
        steps.append(f"{c['episodic_steps_full']} epi (ways {c['episodic_ways']}, q {c['episodic_queries']}, mb {c['meta_batch']})")
    if c.get("validation_episodes_full"):
        steps.append(f"{c['validation_episodes_full']} val")
    steps.append(f"{c['eval_episodes_full']} test")
    peak = max(c["peak_mb"].values())
    ok = "ok" if c.get("end_to_end_ok") else "FAILED"
    print(f"| {name} | {'+'.join(c['stages'])} | {ok}, {c['end_to_end_s']:.0f} s | {fmt('pretrain_step_s', 'pre_step')} | "
          f"{fmt('episodic_step_s', 'epi_step')} | {fmt('eval_episode_s', 'eval_episode')} | {peak:.0f} | "
          f"{'; '.join(steps)} | {c['projected_full_h']:.0f} ({c['projected_full_cpu_h']:.0f}) |")
