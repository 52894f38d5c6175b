"""Every Table-6 cell under the ``paper`` profile at 84 px with only the budgets cut: proof that each
runs end to end, and its measured seconds per training step and peak memory, with the projected time
of the full budget (issue 13, item 4; the table is in docs/protocols.md).

Mini-ImageNet is not needed: the cells run on the embedded ``glyphs`` dataset at 84 px (same image
size and split sizes; 80 images per class instead of 600) with ``--profile paper`` and the cut budgets
of ``benchmarks/paper_cut_budget.yaml`` (a ``--config`` file: 1 pretraining step, 1 episodic step,
1 test episode). Every setting other than the budgets is the paper profile's.

Each cell runs in a fresh subprocess with one torch thread:

1. ``runner.run`` with the cut budgets (every training stage, evaluation, leaderboard row);
2. the cost of one step of each stage with the cell's own sizes, timed after a warm-up (median of
   ``--reps``, default 1; wall and process CPU time): a pretraining step (batch of ``pretrain.batch_size`` 84 px images, forward, backward,
   SGD), an episodic step (``meta_batch`` training episodes of the cell's ways/shots/queries, loss,
   backward, Adam) and a test episode (``fit_support`` + ``forward`` under ``no_grad``);
3. the peak RSS of each timed phase above the RSS before it (``clear_refs`` / ``VmHWM``).

Projection of the full budget on this CPU: pretraining steps = ``epochs * ceil(38400 / batch_size)``
(the 38400 Mini-ImageNet base images), episodic steps = ``episodic.steps``, 600 test episodes, plus the validation
episodes of the stages that validate (``steps // val_every * val_episodes``, each costing about a test episode).

    .venv/bin/python benchmarks/paper_cells.py [--out benchmarks/paper_cells.json] [--cells 0,3]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CUT = ROOT / "benchmarks" / "paper_cut_budget.yaml"
MINI_BASE_IMAGES = 64 * 600


def cells():
    from fewshot_nsl.config import parse_yaml

    return parse_yaml((ROOT / "configs" / "table6.yaml").read_text())["rows"]


def measure_cell(index: int, reps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from common import _status_kib, reset_peak_rss
    from fewshot_nsl.config import resolve_config
    from fewshot_nsl.data.episodes import EpisodeSampler, Materialiser
    from fewshot_nsl.runner import build_method, load_store, run, stages_of

    torch.set_num_threads(1)
    row = cells()[index]
    tmp = Path(tempfile.mkdtemp(prefix="paper_cell_"))
    cache = Path(os.environ.get("PAPER_CELLS_CACHE", tmp / "cache"))  # share the 84 px glyphs store between cells
    cli = {"method": row["method"], "backbone": row["backbone"], "shots": row["shots"], "profile": "paper",
           "dataset": "glyphs", "image_size": 84, "device": "cpu", "results_dir": str(tmp / "results"),
           "cache_dir": str(cache)}
    full = resolve_config(cli)
    cfg = resolve_config(cli, str(CUT))
    stages = stages_of(cfg)
    out = {"cell": index, "method": cfg.method, "backbone": cfg.backbone, "shots": cfg.shots, "stages": list(stages)}

    t0 = time.perf_counter()
    result = run(cfg, progress=False, log=lambda *a: None)
    out["end_to_end_s"] = time.perf_counter() - t0
    out["end_to_end_ok"] = bool(result.get("episodes", 0) >= 1)

    store = load_store(cfg)
    torch.manual_seed(0)
    method = build_method(cfg)
    out["params"] = sum(p.numel() for p in method.parameters())
    dev = torch.device("cpu")

    def timed(fn, n):
        fn()  # warm-up
        reset_peak_rss()
        base = _status_kib("VmRSS")
        times, cpu = [], []
        for _ in range(n):
            t, c = time.perf_counter(), time.process_time()
            fn()
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        cpu_times[fn.__name__] = statistics.median(cpu)
        return statistics.median(times), (_status_kib("VmHWM") - base) / 1024

    peaks, cpu_times = {}, {}
    if "pretrain" in stages:
        module = method.pretrain_module()
        n_base = len(store.classes_in_split("train"))
        head = nn.Linear(module.feature_dim(84), n_base)
        opt = torch.optim.SGD(list(module.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
        x = torch.randn(cfg.pretrain.batch_size, 3, 84, 84).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, n_base, (cfg.pretrain.batch_size,))
        module.train()

        def pre_step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(head(module(x)), y).backward()
            opt.step()

        out["pretrain_step_s"], peaks["pretrain"] = timed(pre_step, reps)
        out["pretrain_steps_full"] = full.pretrain.epochs * math.ceil(MINI_BASE_IMAGES / full.pretrain.batch_size)
        method.after_pretrain()
    mat = Materialiser(store, 84, dev)
    if "episodic" in stages:
        e = cfg.episodic
        sampler = EpisodeSampler(store, "train", e.ways or cfg.ways, e.shots or cfg.shots, e.queries, seed=1)
        params = [p for p in method.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=e.lr)
        episodes = [mat(next(sampler)) for _ in range(e.meta_batch)]
        method.train()

        def epi_step():
            opt.zero_grad(set_to_none=True)
            for t in episodes:
                (method.loss(t.support_x, t.support_y, t.query_x, t.query_y) / e.meta_batch).backward()
            opt.step()

        out["episodic_step_s"], peaks["episodic"] = timed(epi_step, reps)
        out["episodic_steps_full"] = full.episodic.steps
        out["episodic_ways"], out["episodic_queries"], out["meta_batch"] = e.ways or cfg.ways, e.queries, e.meta_batch
    test = EpisodeSampler(store, "test", cfg.ways, cfg.shots, cfg.eval.queries, seed=2)
    t = mat(next(test))
    method.eval()

    def eval_episode():
        with torch.no_grad():
            method.fit_support(t.support_x, t.support_y)
            method(t.query_x)

    out["eval_episode_s"], peaks["eval"] = timed(eval_episode, reps)
    out["peak_mb"] = peaks
    out["cpu_s"] = cpu_times  # process CPU time (one thread): the work, unaffected by waiting for a core
    out["eval_episodes_full"] = full.eval.episodes
    # validation episodes of the full budget (fewshot_nsl.validation), each costing about one test episode
    val = 0
    for section, steps in ((full.pretrain, out.get("pretrain_steps_full", 0)), (full.episodic, out.get("episodic_steps_full", 0))):
        if section.val_every:
            val += (steps // section.val_every) * section.val_episodes
    out["validation_episodes_full"] = val

    def projection(pre, epi, ev):
        return (ev * (full.eval.episodes + val) + (pre or 0.0) * out.get("pretrain_steps_full", 0)
                + (epi or 0.0) * out.get("episodic_steps_full", 0)) / 3600

    out["projected_full_h"] = projection(out.get("pretrain_step_s"), out.get("episodic_step_s"), out["eval_episode_s"])
    out["projected_full_cpu_h"] = projection(cpu_times.get("pre_step"), cpu_times.get("epi_step"),
                                             cpu_times["eval_episode"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "paper_cells.json"))
    ap.add_argument("--cells", default=None, help="comma-separated indices into configs/table6.yaml rows")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.one is not None:
        print("CELL_RESULT " + json.dumps(measure_cell(args.one, args.reps)), flush=True)
        return
    todo = [int(i) for i in args.cells.split(",")] if args.cells else list(range(len(cells())))
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.is_file() else {}
    for i in todo:
        r = cells()[i]
        print(f"cell {i}: {r['method']} {r['backbone']} {r['shots']}-shot ...", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--one", str(i), "--reps", str(args.reps)],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("CELL_RESULT ")]
        if proc.returncode or not line:
            results[str(i)] = {"cell": i, "method": r["method"], "backbone": r["backbone"], "shots": r["shots"],
                               "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
        else:
            results[str(i)] = json.loads(line[0][len("CELL_RESULT "):])
        print("   ", json.dumps(results[str(i)]), flush=True)
        path.write_text(json.dumps(results, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
