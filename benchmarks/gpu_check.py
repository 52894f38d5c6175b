"""One prepared GPU check of the suite (issue 27, item 5): run it as is on any CUDA machine, commit what it writes.

    python benchmarks/gpu_check.py                 # CUDA: at most 8 minutes; writes benchmarks/GPU_RESULTS.md
    python benchmarks/gpu_check.py --cpu-dry-run   # the same code path on the CPU at tiny sizes (the test suite runs it)

Sections, each in its own process with its own time limit (a section that fails or hangs is reported
and the next one runs; the limits add up to the 8-minute budget, ``--budget``):

1. device and versions: torch, CUDA, cuDNN, GPU, memory, driver, Python, package version and git commit;
2. the smoke cell of every registered method at 84 px on CUDA, through ``fewshot_nsl.benchmark``
   (profile ``smoke``, ``image_size=84``, a few fixed test episodes, ``compile="off"``): pass/fail, time;
3. a pretraining (finetune's plain CNN-4 and the dynamic NSN) killed with SIGKILL once its first
   ``.partial`` checkpoint is in the cache, run again (the same ``python -m fewshot_nsl`` command,
   ``--deterministic``), and its cached weights compared tensor by tensor with those of an uninterrupted
   run of the same command;
4. seconds per training step, steps per second and peak GPU memory
   (``torch.cuda.max_memory_allocated``) of every ``paper`` cell of ``configs/table6.yaml`` at 84 px
   (pretraining step, episodic step, test episode), timed as ``benchmarks/paper_cells.py`` times them
   on the CPU, on the GPU and after a warm-up;
5. the projected GPU-hours of every ``paper`` cell and of the whole grid, from those step times and the
   paper profile's budgets (pretraining on the 38400 Mini-ImageNet base images, episodic steps,
   validation episodes, 600 test episodes);
6. ``compile`` on vs off and ``precision`` bf16 vs fp32 on the dynamic NSN (paper settings, budgets
   cut): accuracy on the same fixed test episodes (paired differences to fp32 eager) and the step time.
   The eager arms run first, in their own process with their own limit; the compiled arms run after them in
   another process with a limit of their own (``timeouts["compiled"]``), so a slow compilation cannot take the
   eager arms' time. Every arm's pretraining step is timed first (for a compiled arm that compiles the
   pretraining network, reported at once) and its accuracy run (which compiles the same network again, a hit
   of the compile caches of the same process, then the evaluation shapes) comes after.

The report (``--out``, default ``benchmarks/GPU_RESULTS.md`` on a GPU) and ``--json`` are rewritten after every
section, so a check stopped or killed later keeps the results of every section it finished; SIGTERM or Ctrl-C
kills the running section's processes and writes the report with what was finished.

``--cpu-dry-run`` runs every section on the CPU at 16 px with one torch thread, a few steps and 2-3
episodes, a subset of methods and cells (a pretraining and an episodic method; finetune's pretraining,
narrowed, killed and resumed) and no compiled arm (compilation on the CPU takes minutes); its figures
say nothing about a GPU. Data: the embedded ``glyphs`` dataset (``--dataset``/``--data-root`` for
Mini-ImageNet). Everything a run writes goes to ``--work`` (default: a temporary folder, removed).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DEFAULT_OUT = ROOT / "benchmarks" / "GPU_RESULTS.md"
#: Sections in the order they run (the cheapest and most basic first, the compiled arms last).
SECTIONS = ("data", "smoke", "resume", "steps", "precision")
PROGRESS, RESULT = "@progress ", "@result "


# ----------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """What one invocation measures; :func:`gpu_plan` and :func:`dry_run_plan` are the two used."""

    dry_run: bool
    device: str
    image_size: int
    work: str
    dataset: str = "glyphs"
    data_root: Optional[str] = None
    threads: Optional[int] = None
    smoke_methods: Optional[List[str]] = None  # None: every registered method
    smoke_episodes: int = 5
    resume_methods: List[str] = field(default_factory=lambda: ["finetune", "dynamic_nsn"])
    resume_epochs: int = 3
    resume_sets: List[str] = field(default_factory=list)  # further --set options of the killed command
    step_cells: Optional[List[List[Any]]] = None  # [method, backbone, shots]; None: every configs/table6.yaml row
    step_warmup: int = 1
    step_reps: int = 3
    arms: List[List[str]] = field(default_factory=lambda: [["fp32", "off"], ["bf16", "off"], ["fp32", "on"],
                                                           ["bf16", "on"]])
    skipped_arms: List[List[str]] = field(default_factory=list)  # [precision, compile, why]
    arm_pretrain: Dict[str, Any] = field(default_factory=lambda: {"epochs": 2, "max_steps": None})
    arm_episodes: int = 100
    arm_head_epochs: int = 25
    arm_warmup: int = 3
    arm_reps: int = 10
    # seconds per section; on a GPU they add up to the budget, 10 s under 8 minutes (the versions and the report).
    # "precision" is the eager arms' limit, "compiled" the compiled arms' own (run after them, in their own process).
    timeouts: Dict[str, float] = field(default_factory=lambda: {"data": 45, "smoke": 90, "resume": 100, "steps": 80,
                                                                "precision": 70, "compiled": 85})
    budget_s: float = 470.0

    @property
    def cache_dir(self) -> Path:
        return Path(self.work) / "cache"


def gpu_plan(work: str, **kw: Any) -> Plan:
    """Full sizes on CUDA: 84 px, every method and paper cell, four compile/precision arms."""
    return Plan(dry_run=False, device="cuda", image_size=84, work=work, **kw)


def dry_run_plan(work: str, **kw: Any) -> Plan:
    """The same code path on the CPU at tiny sizes (under a minute on an idle core)."""
    why = "not in the CPU dry run: compilation on the CPU takes minutes (benchmarks/RESULTS.md)"
    return Plan(dry_run=True, device="cpu", image_size=16, work=work, threads=1,
                smoke_methods=["finetune", "protonet"], smoke_episodes=2,
                resume_methods=["finetune"], resume_epochs=3,
                resume_sets=["pretrain.batch_size=512", "backbone_options.filters=8"],
                step_cells=[["finetune", "cnn4", 5], ["protonet", "cnn4", 5], ["dynamic_nsn", "cnn4", 5]],
                step_warmup=1, step_reps=1,
                arms=[["fp32", "off"], ["bf16", "off"]],
                skipped_arms=[["fp32", "on", why], ["bf16", "on", why]],
                arm_pretrain={"epochs": 1, "max_steps": 2}, arm_episodes=3, arm_head_epochs=2, arm_warmup=1,
                arm_reps=1,
                timeouts={"data": 60, "smoke": 60, "resume": 90, "steps": 60, "precision": 60, "compiled": 60},
                budget_s=330.0, **kw)


def save_plan(plan: Plan, path: Path) -> None:
    path.write_text(json.dumps(dataclasses.asdict(plan), indent=1))


def load_plan(path: Path) -> Plan:
    return Plan(**json.loads(Path(path).read_text()))


# ----------------------------------------------------------------------------- child side: helpers
def emit(kind: str, payload: Any) -> None:
    """One line to the parent: ``@progress text`` or ``@result {json}``."""
    text = payload if kind == PROGRESS else json.dumps(payload, default=_plain)
    print(kind + text, flush=True)


def _plain(value: Any) -> Any:
    """JSON form of what :mod:`json` cannot write: numpy scalars as numbers, anything else as text."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else str(value)


def error_line(exc: BaseException) -> str:
    from fewshot_nsl.errors import one_line

    return one_line(exc, limit=300)


def base_cli(plan: Plan, **extra: Any) -> Dict[str, Any]:
    """Config keys shared by every run of the check (a ``resolve_config`` / ``benchmark`` dict)."""
    cli = {"dataset": plan.dataset, "data_root": plan.data_root, "image_size": plan.image_size,
           "device": plan.device, "cache_dir": str(plan.cache_dir)}
    cli.update(extra)
    return {k: v for k, v in cli.items() if v is not None}


def api_overrides(cli: Dict[str, Any]) -> Dict[str, Any]:
    """``cli`` without the keys :func:`fewshot_nsl.benchmark` takes as its own arguments."""
    return {k: v for k, v in cli.items() if k not in ("method", "backbone", "shots", "dataset")}


def setup_torch(plan: Plan) -> Any:
    import torch

    if plan.threads:
        torch.set_num_threads(plan.threads)
    return torch


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: Any, warmup: int, reps: int) -> Dict[str, float]:
    """Median seconds of ``fn`` over ``reps`` calls after ``warmup`` calls (synchronised on CUDA), the
    warm-up's seconds (compilation happens there) and the peak memory of the timed calls in MiB
    (``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS on the CPU)."""
    from fewshot_nsl.provenance import peak_memory_mb, reset_peak_memory

    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    synchronize(device)
    warm = time.perf_counter() - t0
    reset_peak_memory(device)
    times = []
    for _ in range(max(reps, 1)):
        t = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t)
    return {"s": statistics.median(times), "warmup_s": warm, "peak_mb": peak_memory_mb(device)}


def prepare_method(cfg: Any) -> Tuple[Any, Any, Dict[str, bool], bool]:
    """The method of ``cfg`` on its device, built as a run builds it
    (:func:`fewshot_nsl.process_setup.build_for_device`, as :func:`fewshot_nsl.runner.train`): seeded, the CUDA
    fast mode on unless ``deterministic`` (cuDNN autotuner, TF32, channels-last weights).

    Returns:
        ``(method, device, fast-mode switches, compiled)``; ``compiled``: whether the run's ``compile`` setting
        compiles (the caller compiles what it times).
    """
    from fewshot_nsl.process_setup import build_for_device
    from fewshot_nsl.runner import resolve_device

    device = resolve_device(cfg.device)
    built = build_for_device(cfg, device, log=lambda _line: None)
    return built.method, device, built.fast, built.compiled


# ----------------------------------------------------------------------------- child: data, smoke
def child_data(plan: Plan) -> None:
    """Build (or load) the dataset store of the check once, so later sections time no data generation."""
    from fewshot_nsl.config import resolve_config
    from fewshot_nsl.runner import load_store

    setup_torch(plan)
    t0 = time.perf_counter()
    store = load_store(resolve_config(base_cli(plan, method="protonet", profile="smoke")))
    emit(RESULT, {"ok": True, "dataset": store.name, "synthetic": bool(store.synthetic), "images": len(store.labels),
                  "image_size": plan.image_size, "fingerprint": store.fingerprint(),
                  "seconds": time.perf_counter() - t0})


def smoke_methods(plan: Plan) -> List[str]:
    from fewshot_nsl.registry import list_methods

    return list(plan.smoke_methods) if plan.smoke_methods else list_methods()


def child_smoke(plan: Plan) -> None:
    """Every method's smoke cell through the Python API, one after the other."""
    import fewshot_nsl
    from fewshot_nsl.config import resolve_config
    from fewshot_nsl.runner import stages_of

    setup_torch(plan)
    for name in smoke_methods(plan):
        cli = base_cli(plan, method=name, shots=5, profile="smoke", compile="off",
                       eval={"episodes": plan.smoke_episodes}, results_dir=str(Path(plan.work) / "smoke"))
        item: Dict[str, Any] = {"method": name, "ok": False}
        t0 = time.perf_counter()
        try:
            item["stages"] = list(stages_of(resolve_config(cli)))
            rows = fewshot_nsl.benchmark(method=name, shots=5, dataset=plan.dataset, threads=plan.threads,
                                         **api_overrides(cli))
            row = rows.iloc[0].to_dict()
            item.update({k: row.get(k) for k in ("accuracy", "ci95", "episodes", "episodes_failed", "train_time_s",
                                                  "eval_time_s", "peak_memory_mb", "device", "device_name",
                                                  "fast_mode")})
            good = int(row["episodes"]) == plan.smoke_episodes and int(row["episodes_failed"]) == 0
            item["ok"] = bool(good and math.isfinite(float(row["accuracy"])))
            if not item["ok"]:
                item["error"] = f"{row['episodes_failed']} of {row['episodes']} episodes failed"
        except Exception as exc:  # reported, the next method runs
            item["error"] = error_line(exc)
        item["seconds"] = time.perf_counter() - t0
        emit(RESULT, item)
        emit(PROGRESS, f"smoke {name}: {'ok' if item['ok'] else 'FAILED'} ({item['seconds']:.1f} s)")


# ----------------------------------------------------------------------------- child: kill and resume
def resume_sets(plan: Plan) -> List[str]:
    """The ``--set`` options of the killed-and-resumed command (also what :func:`resume_config` resolves)."""
    return [f"pretrain.epochs={plan.resume_epochs}", "pretrain.max_steps=null", "eval.episodes=2", *plan.resume_sets]


def resume_command(plan: Plan, method: str, results: Path) -> List[str]:
    """The ``python -m fewshot_nsl`` command whose pretraining is killed and resumed."""
    cmd = [sys.executable, "-m", "fewshot_nsl", "--method", method, "--shots", "5", "--dataset", plan.dataset,
           "--profile", "smoke", "--image-size", str(plan.image_size), "--device", plan.device, "--deterministic",
           "--compile", "off", "--cache-dir", str(plan.cache_dir), "--results-dir", str(results), "--quiet"]
    for option in resume_sets(plan):
        cmd += ["--set", option]
    if plan.data_root:
        cmd += ["--data-root", plan.data_root]
    if plan.threads:
        cmd += ["--threads", str(plan.threads)]
    return cmd


def resume_config(plan: Plan, method: str, results: Path) -> Any:
    """The config :func:`resume_command` resolves to (to clear its pretraining cache file first)."""
    from fewshot_nsl.config import merge, parse_set_options, resolve_config

    cli = base_cli(plan, method=method, shots=5, profile="smoke", deterministic=True, compile="off",
                   results_dir=str(results))
    return resolve_config(merge(cli, parse_set_options(resume_sets(plan))))


def run_to_end(cmd: List[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{' '.join(cmd[3:5])} exited with status {proc.returncode}: {tail[0]}")


def kill_at_first_partial(cmd: List[str], cwd: Path, folder: Path) -> Tuple[float, Path]:
    """Start ``cmd`` and SIGKILL it as soon as a new ``*.partial`` checkpoint is in ``folder``.

    Returns:
        The seconds it ran, and that checkpoint.

    Raises:
        RuntimeError: it ended before a ``.partial`` appeared.
    """
    def partials() -> set:  # written through a hidden temporary file, then renamed: only whole files count
        return {p for p in folder.glob("*.partial") if not p.name.startswith(".")}

    before = partials()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            new = sorted(partials() - before)
            if new:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return time.perf_counter() - t0, new[0]
            if proc.poll() is not None:
                tail = proc.stderr.read().decode(errors="replace").strip().splitlines()[-1:] if proc.stderr else []
                raise RuntimeError(f"the run ended (status {proc.returncode}) before its first .partial checkpoint"
                                   f"{': ' + tail[0] if tail else ''}")
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def pretraining_of(plan: Plan, results: Path) -> Tuple[Path, bool]:
    """The pretraining cache file the finished run in ``results`` used, and whether it was a cache hit
    (from its ``train.json``)."""
    record = json.loads(next((results / "runs").glob("*/train.json")).read_text())["training"]["pretrain"]
    return plan.cache_dir / record["cache_file"], bool(record["cached"])


def compare_pretrainings(a_path: Path, b_path: Path) -> Dict[str, Any]:
    """Tensor-by-tensor comparison of two cached pretrainings (``module`` state dicts: weights, BN statistics)
    and of their recorded train accuracy, step count and training curve."""
    import torch

    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (a_path, b_path))
    ma, mb = a["module"], b["module"]
    common = [k for k in ma if k in mb]
    differing = [k for k in common if ma[k].shape != mb[k].shape or not torch.equal(ma[k], mb[k])]
    diffs = [float((ma[k].double() - mb[k].double()).abs().max()) for k in differing
             if ma[k].shape == mb[k].shape and ma[k].is_floating_point()]
    same_keys = set(ma) == set(mb)
    same_record = (a.get("train_accuracy") == b.get("train_accuracy") and a.get("steps") == b.get("steps")
                   and a.get("curve") == b.get("curve"))
    return {"tensors": len(common), "same_keys": same_keys, "differing": differing[:5], "n_differing": len(differing),
            "max_abs_diff": max(diffs, default=0.0), "same_record": same_record,
            "identical": bool(same_keys and not differing and same_record), "steps": b.get("steps")}


def leaderboard_accuracy(results: Path) -> Optional[float]:
    import fewshot_nsl

    try:
        return float(fewshot_nsl.load_results(results).iloc[0]["accuracy"])
    except Exception:  # noqa: BLE001 - only shown beside the weights' comparison
        return None


def resume_one(plan: Plan, method: str) -> Dict[str, Any]:
    """Uninterrupted run, then the same command killed at its first ``.partial`` and run again; compared."""
    import torch

    from fewshot_nsl.registry import get_method_class
    from fewshot_nsl.runner import conv_spec_of, load_store
    from fewshot_nsl.training_state import pretrain_cache_path

    base = Path(plan.work) / "resume" / method
    ref_results, res_results = base / "uninterrupted", base / "killed_and_resumed"
    base.mkdir(parents=True, exist_ok=True)
    cfg = resume_config(plan, method, ref_results)
    store = load_store(cfg)
    expected = pretrain_cache_path(cfg, store, conv_spec_of(cfg), get_method_class(method), plan.cache_dir)
    for p in (expected, expected.with_name(expected.name + ".partial")):  # a check run before in this --work
        p.unlink(missing_ok=True)
    per_epoch = math.ceil(sum(len(store.class_members(c)) for c in store.classes_in_split("train"))
                          / cfg.pretrain.batch_size)
    item: Dict[str, Any] = {"method": method, "epochs": plan.resume_epochs, "total_steps": per_epoch * plan.resume_epochs}

    run_to_end(resume_command(plan, method, ref_results), base)
    ref_cache, hit = pretraining_of(plan, ref_results)
    if hit:
        raise RuntimeError(f"the uninterrupted run reused a cached pretraining ({ref_cache.name}) instead of training")
    reference = ref_cache.with_name(ref_cache.stem + ".uninterrupted.pt")
    ref_cache.rename(reference)  # out of the way: the next run trains the same pretraining again
    emit(PROGRESS, f"resume {method}: uninterrupted run done")
    item["killed_after_s"], partial = kill_at_first_partial(resume_command(plan, method, res_results), base,
                                                            expected.parent)
    item["partial_step"] = int(torch.load(partial, map_location="cpu", weights_only=True)["step"])
    item["same_key"] = partial.name == ref_cache.name + ".partial"
    item["cache_after_kill"] = partial.with_suffix("").is_file()
    emit(PROGRESS, f"resume {method}: killed (SIGKILL) after {item['killed_after_s']:.1f} s, "
                   f".partial at step {item['partial_step']}")
    run_to_end(resume_command(plan, method, res_results), base)
    res_cache, hit = pretraining_of(plan, res_results)
    item["resumed_the_partial"] = not hit and res_cache.name + ".partial" == partial.name and not partial.is_file()
    item.update(compare_pretrainings(reference, res_cache))
    item["eval_accuracy"] = [leaderboard_accuracy(ref_results), leaderboard_accuracy(res_results)]
    item["ok"] = bool(item["identical"] and item["same_key"] and item["resumed_the_partial"]
                      and not item["cache_after_kill"] and 0 < item["partial_step"] < item["total_steps"])
    if not (item["same_key"] and res_cache.name + ".partial" == partial.name):
        item["error"] = ("the pretraining cache key changed between the runs, so nothing could resume: the code "
                         "was edited while the check ran; run it again on a quiet checkout")
    elif not item["ok"] and not item["resumed_the_partial"]:
        item["error"] = "the run after the kill did not resume from the .partial checkpoint"
    return item


def child_resume(plan: Plan) -> None:
    setup_torch(plan)
    for method in plan.resume_methods:
        t0 = time.perf_counter()
        try:
            item = resume_one(plan, method)
        except Exception as exc:  # reported, the next method runs
            item = {"method": method, "ok": False, "error": error_line(exc)}
        item["seconds"] = time.perf_counter() - t0
        emit(RESULT, item)
        emit(PROGRESS, f"resume {method}: {'identical' if item.get('identical') else 'NOT identical'} "
                       f"({item['seconds']:.1f} s)")


# ----------------------------------------------------------------------------- child: step times
def table6_cells() -> List[List[Any]]:
    """``[method, backbone, shots]`` of every row of ``configs/table6.yaml`` (benchmarks/paper_cells.py's cells)."""
    from paper_cells import cells

    return [[r["method"], r["backbone"], int(r["shots"])] for r in cells()]


def full_budget(cfg: Any) -> Dict[str, int]:
    """Optimiser steps and episodes of a paper cell's full budget (pretraining over the 38400 base images)."""
    from fewshot_nsl.runner import stages_of

    stages = stages_of(cfg)
    out = {"pretrain_steps": 0, "episodic_steps": 0, "val_episodes": 0, "test_episodes": cfg.eval.episodes}
    if "pretrain" in stages:
        p = cfg.pretrain
        from paper_cells import MINI_BASE_IMAGES  # 64 x 600: the pretraining epochs are over these

        steps = p.epochs * math.ceil(MINI_BASE_IMAGES / p.batch_size)
        out["pretrain_steps"] = min(steps, p.max_steps) if p.max_steps else steps
        if p.val_every:
            out["val_episodes"] += (out["pretrain_steps"] // p.val_every) * p.val_episodes
    if "episodic" in stages:
        e = cfg.episodic
        out["episodic_steps"] = e.steps
        if e.val_every:
            out["val_episodes"] += (e.steps // e.val_every) * e.val_episodes
    return out


def pretrain_step_fn(method: Any, cfg: Any, store: Any, device: Any, compiled: bool = False) -> Callable[[], None]:
    """One base-class pretraining step as :func:`fewshot_nsl.training.pretrain` takes it (network + linear head,
    cross-entropy + the method's regulariser under the run's ``precision`` autocast, loss scaling for fp16, the
    profile's optimiser), on a batch of real images. The network is the one pretraining builds (its
    ``_PretrainNet``), so a compiled step compiles the graph a compiled run's pretraining compiles, and a run in the
    same process after it finds it in the compile caches."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from fewshot_nsl.data.episodes import Materialiser
    from fewshot_nsl.precision import autocast, grad_scaler
    from fewshot_nsl.training import _PretrainNet, pretrain_optimizer

    module = method.pretrain_module().to(device).train()
    classes = store.classes_in_split("train")
    head = nn.Linear(method.backbone.feature_dim(cfg.image_size), len(classes)).to(device)
    net = _PretrainNet(module, head)
    if compiled:
        from fewshot_nsl.compiling import compile_in_place

        compile_in_place(net)
    params = list(module.parameters()) + list(head.parameters())
    opt, sched = pretrain_optimizer(params, cfg.pretrain, 10**6)
    import numpy as np

    index = np.concatenate([store.class_members(c) for c in classes])[: cfg.pretrain.batch_size]
    x = Materialiser(store, cfg.image_size, device).images(index)
    y = torch.randint(0, len(classes), (len(index),), device=device)

    scaler = grad_scaler(cfg.precision, device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(cfg.precision, device):
            loss = F.cross_entropy(net(x), y) + method.regularization()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()

    return step


def episodic_step_fn(method: Any, cfg: Any, store: Any, device: Any) -> Callable[[], None]:
    """One episodic optimiser step: ``meta_batch`` training episodes of the cell's sizes, Adam."""
    import torch

    from fewshot_nsl.data.episodes import EpisodeSampler, Materialiser

    e = cfg.episodic
    sampler = EpisodeSampler(store, "train", e.ways or cfg.ways, e.shots or cfg.shots, e.queries, seed=1)
    mat = Materialiser(store, cfg.image_size, device)
    episodes = [mat(next(sampler)) for _ in range(e.meta_batch)]
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=e.lr)
    method.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for t in episodes:
            (method.loss(t.support_x, t.support_y, t.query_x, t.query_y) / e.meta_batch).backward()
        opt.step()

    return step


def test_episode_fn(method: Any, cfg: Any, store: Any, device: Any) -> Callable[[], None]:
    """One test episode as the harness runs it: ``fit_support`` + ``forward`` under ``no_grad``, eval mode."""
    import torch

    from fewshot_nsl.data.episodes import EpisodeSampler, Materialiser

    t = Materialiser(store, cfg.image_size, device)(next(EpisodeSampler(store, "test", cfg.ways, cfg.shots,
                                                                        cfg.eval.queries, seed=2)))
    method.eval()

    def episode() -> None:
        with torch.no_grad():
            method.fit_support(t.support_x, t.support_y)
            method(t.query_x)

    return episode


def measure_cell(plan: Plan, method_name: str, backbone: str, shots: int, store: Any) -> Dict[str, Any]:
    """Step times and peak memory of one paper cell (fp32, eager, the fast non-deterministic mode)."""
    import torch

    from fewshot_nsl.config import resolve_config
    from fewshot_nsl.precision import fast_mode_text
    from fewshot_nsl.registry import get_method_class
    from fewshot_nsl.runner import conv_spec_of, stages_of
    from fewshot_nsl.training_state import pretrain_key

    cfg = resolve_config(base_cli(plan, method=method_name, backbone=backbone, shots=shots, profile="paper",
                                  results_dir=str(Path(plan.work) / "steps")))
    stages = stages_of(cfg)
    method, device, fast, _ = prepare_method(cfg)  # timed eager, whatever compile: auto would do
    out: Dict[str, Any] = {"method": method_name, "backbone": backbone, "shots": shots, "stages": list(stages),
                           "params": int(sum(p.numel() for p in method.parameters())), "fast_mode": fast_mode_text(fast),
                           **full_budget(cfg)}
    if "pretrain" in stages:
        out["pretrain_key"] = pretrain_key(cfg, store, conv_spec_of(cfg), get_method_class(method_name))
        out["pretrain"] = timed(pretrain_step_fn(method, cfg, store, device), device, plan.step_warmup, plan.step_reps)
        out["pretrain"]["batch"] = cfg.pretrain.batch_size
        method.after_pretrain()
        method.to(device)
    if "episodic" in stages:
        e = cfg.episodic
        out["episodic"] = timed(episodic_step_fn(method, cfg, store, device), device, plan.step_warmup, plan.step_reps)
        out["episodic"].update(ways=e.ways or cfg.ways, queries=e.queries, meta_batch=e.meta_batch)
    out["test"] = timed(test_episode_fn(method, cfg, store, device), device, plan.step_warmup, plan.step_reps)
    del method
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out["ok"] = True
    return out


def child_steps(plan: Plan) -> None:
    from fewshot_nsl.config import resolve_config
    from fewshot_nsl.runner import load_store

    setup_torch(plan)
    store = load_store(resolve_config(base_cli(plan, method="protonet", profile="paper")))
    for method, backbone, shots in plan.step_cells or table6_cells():
        t0 = time.perf_counter()
        try:
            item = measure_cell(plan, method, backbone, shots, store)
        except Exception as exc:  # reported, the next cell runs
            item = {"method": method, "backbone": backbone, "shots": shots, "ok": False, "error": error_line(exc)}
        item["seconds"] = time.perf_counter() - t0
        emit(RESULT, item)
        emit(PROGRESS, f"steps {method} {backbone} {shots}-shot: {'ok' if item['ok'] else 'FAILED'} "
                       f"({item['seconds']:.1f} s)")


# ----------------------------------------------------------------------------- child: compile and precision
def arm_cli(plan: Plan, precision: str, compile_setting: str) -> Dict[str, Any]:
    """The dynamic NSN cell of one arm: paper settings at the check's image size, budgets cut."""
    return base_cli(plan, method="dynamic_nsn", shots=5, profile="paper", precision=precision,
                    compile=compile_setting, pretrain=dict(plan.arm_pretrain), eval={"episodes": plan.arm_episodes},
                    method_options={"epochs": plan.arm_head_epochs},
                    results_dir=str(Path(plan.work) / "precision" / f"{precision}_{compile_setting}"))


def arm_accuracy(plan: Plan, cli: Dict[str, Any]) -> Dict[str, Any]:
    """Train (pretraining cut) and evaluate the arm's cell through the Python API, from a fresh pretraining."""
    import fewshot_nsl
    from fewshot_nsl.config import resolve_config
    from fewshot_nsl.registry import get_method_class
    from fewshot_nsl.runner import conv_spec_of, load_store
    from fewshot_nsl.training_state import pretrain_cache_path

    cfg = resolve_config(cli)
    cache = pretrain_cache_path(cfg, load_store(cfg), conv_spec_of(cfg), get_method_class(cfg.method), plan.cache_dir)
    for p in (cache, cache.with_name(cache.name + ".partial")):  # every arm trains its own pretraining
        p.unlink(missing_ok=True)
    rows = fewshot_nsl.benchmark(method="dynamic_nsn", shots=5, dataset=plan.dataset, threads=plan.threads,
                                 **api_overrides(cli))
    row = rows.iloc[0].to_dict()
    out = {k: row.get(k) for k in ("accuracy", "ci95", "episodes", "episodes_failed", "train_time_s", "eval_time_s",
                                    "peak_memory_mb", "run_id", "precision", "fast_mode")}
    summary = json.loads((Path(cli["results_dir"]) / "runs" / str(row["run_id"]) / "summary.json").read_text())
    out["compiled"] = bool(summary.get("compiled"))
    return out


def arm_step(plan: Plan, cli: Dict[str, Any]) -> Dict[str, Any]:
    """Seconds per pretraining step of the arm's network (a batch of the paper's 64 images), warm-up included
    separately (compilation), peak memory."""
    from fewshot_nsl.config import resolve_config
    from fewshot_nsl.runner import load_store

    cfg = resolve_config(cli)
    method, device, _, compiled = prepare_method(cfg)
    step = pretrain_step_fn(method, cfg, load_store(cfg), device, compiled=compiled)
    out = timed(step, device, plan.arm_warmup, plan.arm_reps)
    out["compiled"] = compiled
    return out


def paired_to_reference(plan: Plan, arm: Dict[str, Any], ref: Dict[str, Any]) -> Dict[str, Any]:
    """Paired difference of the arm's per-episode accuracies to the reference arm's (same fixed episodes)."""
    from fewshot_nsl.episode_log import episode_accuracies
    from fewshot_nsl.stats import paired_compare

    def accs(a: Dict[str, Any]) -> Any:
        return episode_accuracies(Path(plan.work) / "precision" / a["arm"] / "runs" / a["run_id"], plan.arm_episodes)

    a, b = accs(arm), accs(ref)
    c = paired_compare(a, b)
    return {"diff": c.mean_diff, "diff_ci95": c.ci95, "p": c.p_value, "same_episodes": int((a == b).sum())}


#: The two parts of the precision section, each in its own process with its own limit, in this order.
PRECISION_PARTS = ("eager", "compiled")
#: What a timed arm says until its accuracy run has reported (replaced by the arm's full result).
ACCURACY_PENDING = "its accuracy run did not finish within the time limit (the step was measured)"


def part_arms(plan: Plan, part: str) -> List[List[str]]:
    """The ``[precision, compile]`` arms of ``part`` (``eager``: compile off; ``compiled``: the others)."""
    return [a for a in plan.arms if (a[1] == "off") == (part == "eager")]


def reference_arm(plan: Plan) -> Optional[Dict[str, Any]]:
    """The fp32 eager arm's finished run in this ``--work`` (the paired reference; the newest if several), for
    the compiled arms, which run in another process."""
    found = []
    for path in (Path(plan.work) / "precision" / "fp32_off" / "runs").glob("*/summary.json"):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if int(summary.get("episodes") or 0) == plan.arm_episodes:
            found.append((path.stat().st_mtime, summary["run_id"]))
    return {"arm": "fp32_off", "run_id": max(found)[1]} if found else None


def child_precision(plan: Plan, part: str = "eager") -> None:
    """The arms of ``part``: first every arm's pretraining step (a compiled arm compiles its pretraining network
    there; reported at once, so a limit reached later keeps it), then every arm's accuracy run (its pretraining
    compiles the same network: a hit of this process's compile caches; then the evaluation shapes)."""
    setup_torch(plan)
    arms = []
    for precision, compile_setting in part_arms(plan, part):
        t0 = time.perf_counter()
        item: Dict[str, Any] = {"arm": f"{precision}_{compile_setting}", "precision": precision,
                                "compile": compile_setting, "ok": False}
        cli = arm_cli(plan, precision, compile_setting)
        try:
            item["step"] = arm_step(plan, cli)
            item["compiled"] = item["step"]["compiled"]
        except Exception as exc:  # reported; its accuracy run still runs
            item["step_error"] = error_line(exc)
        item["seconds"] = time.perf_counter() - t0
        emit(RESULT, {**item, "error": ACCURACY_PENDING})  # superseded by the arm's full result below
        emit(PROGRESS, f"precision {item['arm']}: step {'measured' if 'step' in item else 'FAILED'} "
                       f"({item['seconds']:.1f} s)")
        arms.append((item, cli))
    reference: Optional[Dict[str, Any]] = None
    for item, cli in arms:
        t0 = time.perf_counter()
        try:
            item.update(arm_accuracy(plan, cli))
            item["ok"] = int(item["episodes_failed"]) == 0 and "step" in item
            if item["arm"] == "fp32_off":
                reference = item
            else:
                ref = reference or reference_arm(plan)
                if ref is not None:
                    item["paired"] = paired_to_reference(plan, item, ref)
        except Exception as exc:  # reported, the next arm runs
            item["ok"] = False
            item["error"] = error_line(exc)
        item["seconds"] += time.perf_counter() - t0
        emit(RESULT, item)
        emit(PROGRESS, f"precision {item['arm']}: {'ok' if item['ok'] else 'FAILED'} ({item['seconds']:.1f} s)")


CHILDREN: Dict[str, Callable[..., None]] = {"data": child_data, "smoke": child_smoke, "resume": child_resume,
                                             "steps": child_steps, "precision": child_precision}


# ----------------------------------------------------------------------------- parent: sections
@dataclass
class Section:
    """What one section's process reported."""

    name: str
    # ok | failed | timed out | interrupted | skipped | not run (| running: in a report written meanwhile)
    status: str = "not run"
    seconds: float = 0.0
    items: List[Dict[str, Any]] = field(default_factory=list)
    error: Optional[str] = None


def _add_item(items: List[Dict[str, Any]], item: Dict[str, Any]) -> None:
    """Append a child's result; a later result of the same precision arm replaces the earlier one in place."""
    if "arm" in item:
        for k, old in enumerate(items):
            if old.get("arm") == item["arm"]:
                items[k] = item
                return
    items.append(item)


def run_section(name: str, cmd: Sequence[str], timeout: float, env: Optional[Dict[str, str]] = None,
                say: Callable[[str], None] = print) -> Section:
    """Run one section's process, relay its progress lines, collect its ``@result`` lines.

    The process runs in its own session; at ``timeout`` seconds the whole session (its subprocesses too) is
    killed with SIGKILL and the section is reported as timed out, with the items it had finished. A
    KeyboardInterrupt (Ctrl-C, or SIGTERM in :func:`main`) while it runs kills it the same way and reports it as
    interrupted.
    """
    sec = Section(name)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                start_new_session=True)
        lines: "queue.Queue[Optional[str]]" = queue.Queue()

        def pump() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        timed_out = interrupted = False
        try:
            while True:
                left = timeout - (time.perf_counter() - t0)
                try:
                    line = lines.get(timeout=max(left, 0.0))
                except queue.Empty:
                    timed_out = True
                    break
                if line is None:
                    break
                if line.startswith(RESULT):
                    try:
                        _add_item(sec.items, json.loads(line[len(RESULT):]))
                    except ValueError:
                        sec.items.append({"ok": False, "error": f"unreadable result line: {line[:200].strip()}"})
                elif line.startswith(PROGRESS):
                    say(f"  {line[len(PROGRESS):].rstrip()}")
        except KeyboardInterrupt:
            interrupted = True
        if timed_out or interrupted:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        err.seek(0)
        tail = [ln for ln in err.read().splitlines() if ln.strip()][-1:]
    sec.seconds = time.perf_counter() - t0
    if interrupted:
        sec.status, sec.error = "interrupted", f"the check was stopped after {sec.seconds:.0f} s (SIGTERM or Ctrl-C)"
    elif timed_out:
        sec.status, sec.error = "timed out", f"killed after {timeout:.0f} s (its time limit)"
    elif proc.returncode:
        sec.status = "failed"
        sec.error = f"its process exited with status {proc.returncode}" + (f": {tail[0].strip()}" if tail else "")
    elif not sec.items or not all(i.get("ok") for i in sec.items):
        sec.status = "failed"
    else:
        sec.status = "ok"
    return sec


def child_env(plan: Plan) -> Dict[str, str]:
    env = dict(os.environ)
    if plan.threads:
        env["OMP_NUM_THREADS"] = str(plan.threads)
    env.setdefault("PYTHONWARNINGS", "ignore")
    # compile caches of this check's own (fresh with a fresh --work, so the compile times are a first run's),
    # shared by the processes of a section: a graph compiled once is found again
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(plan.work) / "compile_cache" / "inductor"))
    env.setdefault("TRITON_CACHE_DIR", str(Path(plan.work) / "compile_cache" / "triton"))
    return env


def child_command(name: str, plan_file: Path, part: Optional[str] = None) -> List[str]:
    """The command of one section's process (``part``: which arms of the precision section)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--plan", str(plan_file)]
    return cmd + (["--part", part] if part else [])


#: Status of a section from its parts', the first of these that any part has.
_WORST = ("interrupted", "timed out", "failed")


def merge_parts(name: str, parts: Sequence[Tuple[str, Section]], pending: Sequence[str] = ()) -> Section:
    """One section from the sections of its parts (``(label, section)``), in order; ``pending``: labels of the
    parts not run yet (a report written meanwhile says so)."""
    sec = Section(name, seconds=sum(p.seconds for _, p in parts))
    for _, p in parts:
        for item in p.items:
            _add_item(sec.items, item)
    statuses = [p.status for _, p in parts]
    sec.status = next((w for w in _WORST if w in statuses), "ok" if parts else "not run")
    if "skipped" in statuses and sec.status == "ok":
        sec.status = "skipped" if set(statuses) == {"skipped"} else "failed"
    notes = [f"{label} arms: {p.error}" for label, p in parts if p.error]
    notes += [f"{label} arms: not finished when this report was written" for label in pending]
    sec.error = "; ".join(notes) or None
    if pending and sec.status == "ok":
        sec.status = "running"
    return sec


def run_sections(plan: Plan, plan_file: Path, names: Sequence[str], say: Callable[[str], None],
                 out: Optional[Dict[str, Section]] = None,
                 on_section: Optional[Callable[[Dict[str, Section]], None]] = None,
                 command: Optional[Callable[..., List[str]]] = None) -> Dict[str, Section]:
    """Every selected section in order, each within its time limit and what is left of the budget.

    The precision section runs its eager arms and then its compiled arms, each part in its own process with its
    own limit (``timeouts["precision"]``, ``timeouts["compiled"]``). ``out`` (filled in place, also returned)
    holds the sections finished so far; ``on_section(out)`` is called after each section and each precision
    part (to write the report so far). A section that was interrupted ends the run: the rest are "not run".
    ``command(name, plan_file[, part])``: a section's process (default :func:`child_command`).
    """
    out = {} if out is None else out
    command = command or child_command
    start = time.perf_counter()

    def limit_of(key: str) -> float:
        """The section's (or part's) own limit, within what is left of the budget; 0: under 5 s of it left."""
        left = plan.budget_s - (time.perf_counter() - start)
        return min(plan.timeouts[key], left) if left >= 5 else 0.0

    def done() -> None:
        if on_section is not None:
            on_section(out)

    stopped = False
    for name in SECTIONS:
        if name not in names:
            out[name] = Section(name, "skipped", error="not selected (--sections)")
            continue
        if stopped:
            out[name] = Section(name, "not run", error="the check was stopped before it")
            continue
        if name == "precision":
            parts = [p for p in PRECISION_PARTS if part_arms(plan, p)]
            ran: List[Tuple[str, Section]] = []
            for k, part in enumerate(parts):
                limit = limit_of("precision" if part == "eager" else part)
                if not limit:
                    ran.append((part, Section(name, "skipped", error=f"skipped, the {plan.budget_s:.0f} s budget "
                                                                     "was spent")))
                    say(f"[precision, {part} arms] skipped: budget spent")
                    continue
                say(f"[precision, {part} arms] started (limit {limit:.0f} s, their own)")
                sec = run_section(name, command(name, plan_file, part), limit, child_env(plan), say)
                ran.append((part, sec))
                say(f"[precision, {part} arms] {sec.status} in {sec.seconds:.1f} s"
                    + (f": {sec.error}" if sec.error else ""))
                if sec.status == "interrupted":
                    break
                if k + 1 < len(parts):  # the eager arms' figures are in the report before any compilation starts
                    out[name] = merge_parts(name, ran, pending=parts[k + 1:])
                    done()
            out[name] = merge_parts(name, ran)
            stopped = out[name].status == "interrupted"
            done()
            continue
        limit = limit_of(name)
        if not limit:
            out[name] = Section(name, "skipped", error=f"the {plan.budget_s:.0f} s budget was spent")
            say(f"[{name}] skipped: budget spent")
            done()
            continue
        say(f"[{name}] started (limit {limit:.0f} s)")
        out[name] = run_section(name, command(name, plan_file), limit, child_env(plan), say)
        say(f"[{name}] {out[name].status} in {out[name].seconds:.1f} s"
            + (f": {out[name].error}" if out[name].error else ""))
        stopped = out[name].status == "interrupted"
        done()
    return out


# ----------------------------------------------------------------------------- parent: versions
def nvidia_smi() -> Dict[str, str]:
    """Driver version and GPU names from ``nvidia-smi`` (empty without it)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {}
    try:
        text = subprocess.run([exe, "--query-gpu=driver_version,name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    first = text.splitlines()[0].split(",") if text else []
    return {"driver": first[0].strip()} if first else {}


def cpu_model() -> str:
    import torch

    from fewshot_nsl.provenance import device_name

    return device_name(torch.device("cpu"))


def versions() -> Dict[str, Any]:
    """Device and software versions of this machine (section 1)."""
    import torch

    from fewshot_nsl.resources import git_info, version

    v: Dict[str, Any] = {
        "date (UTC)": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fewshot_nsl": version(), **{k: v for k, v in git_info().items()},
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "CUDA (torch build)": torch.version.cuda,
        "cuDNN": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "CPU": f"{cpu_model()} ({os.cpu_count()} logical cores)",
    }
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        v.update({"GPU": props.name, "GPU count": torch.cuda.device_count(),
                  "GPU memory (GiB)": round(props.total_memory / 2**30, 1),
                  "compute capability": f"{props.major}.{props.minor}",
                  "bf16 supported": torch.cuda.is_bf16_supported(), **nvidia_smi()})
    else:
        v["GPU"] = "none visible"
    return v


# ----------------------------------------------------------------------------- parent: projection
def project(cells: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Projected hours of each measured cell's full paper budget, and of the grid.

    A cell's hours = pretraining steps x pretraining step + episodic steps x episodic step + (validation +
    test episodes) x test episode. The grid total counts a pretraining shared by several cells (same
    pretraining cache key: the same network, data and settings) once, as a grid run trains it once.
    """
    rows, seen, total, total_unshared = [], set(), 0.0, 0.0
    for c in cells:
        if not c.get("ok"):
            continue
        pre = c["pretrain_steps"] * c["pretrain"]["s"] / 3600 if "pretrain" in c else 0.0
        epi = c["episodic_steps"] * c["episodic"]["s"] / 3600 if "episodic" in c else 0.0
        ev = (c["val_episodes"] + c["test_episodes"]) * c["test"]["s"] / 3600
        shared = "pretrain_key" in c and c["pretrain_key"] in seen
        seen.add(c.get("pretrain_key"))
        hours = pre + epi + ev
        rows.append({"cell": f"{c['method']} {c['backbone']} {c['shots']}-shot", "pretrain_h": pre, "episodic_h": epi,
                     "eval_h": ev, "hours": hours, "pretraining_shared": shared})
        total_unshared += hours
        total += hours - (pre if shared else 0.0)
    return {"cells": rows, "grid_h": total, "grid_unshared_h": total_unshared}


# ----------------------------------------------------------------------------- parent: report
def _f(value: Any, fmt: Optional[str] = None) -> str:
    """A table cell: ``-`` for nothing, floats with ``fmt`` (default 2 decimals), ints and text as they are."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if fmt is None:
        fmt = "d" if isinstance(value, int) else ".2f"
    return format(value, fmt)


def _status_line(sec: Section) -> str:
    text = f"**{sec.status}** in {sec.seconds:.0f} s"
    return text + (f": {sec.error}" if sec.error else "")


def _item_error(item: Dict[str, Any]) -> str:
    return "; ".join(str(item[k]) for k in ("error", "step_error") if item.get(k))


def report(plan: Plan, info: Dict[str, Any], secs: Dict[str, Section]) -> str:
    """The markdown report (stdout and ``--out``)."""
    dev = "CUDA" if not plan.dry_run else "CPU"
    px = f"{plan.image_size} px"
    lines = ["# GPU check of fewshot-nsl (`benchmarks/gpu_check.py`)", ""]
    if plan.dry_run:
        lines += ["**CPU DRY RUN (`--cpu-dry-run`): no GPU figures; this report is not from a GPU.** The same "
                  f"code path on the CPU at {px} with one torch thread, a few steps, 2-3 episodes and a subset of "
                  "methods and cells: every time and memory figure below is from this CPU at these tiny sizes and "
                  "says nothing about a GPU. Run `python benchmarks/gpu_check.py` on a GPU and commit its output "
                  "(`benchmarks/GPU_RESULTS.md`) in place of this one.", ""]
    else:
        lines += [f"Measured on CUDA at {px} with `python benchmarks/gpu_check.py`; rerun it on another GPU "
                  "and commit its output to compare.", ""]
    lines += ["| section | status |", "|---|---|"]
    lines += [f"| {name} | {_status_line(sec)} |" for name, sec in secs.items()]
    lines += ["", "## 1. Device and versions", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_f(v)} |" for k, v in info.items()]
    data = secs["data"].items[0] if secs["data"].items else {}
    if data:
        lines += ["", f"Data: `{data['dataset']}`{' (synthetic)' if data['synthetic'] else ''}, {data['images']} "
                      f"images at {data['image_size']} px, fingerprint `{data['fingerprint']}` "
                      f"(store built or loaded in {data['seconds']:.1f} s)."]
    parts = [(_smoke_report, "smoke", (dev, px)), (_resume_report, "resume", (dev,)), (_steps_report, "steps", (dev, px)),
             (_projection_report, "steps", (dev,)), (_precision_report, "precision", (dev, px))]
    for render, name, extra in parts:
        try:
            lines += render(plan, secs[name], *extra)
        except Exception as exc:  # never lose the other sections' figures to a rendering slip
            lines += ["", f"({render.__name__} could not render the {name} results: {error_line(exc)}; "
                          "they are in the --json output)"]
    return "\n".join(lines) + "\n"


def _smoke_report(plan: Plan, sec: Section, dev: str, px: str) -> List[str]:
    out = ["", f"## 2. Smoke cell of every method ({px}, {dev})", "",
           f"`fewshot_nsl.benchmark(method=..., shots=5, profile=\"smoke\", image_size={plan.image_size}, "
           f"device=\"{plan.device}\", compile=\"off\", eval={{\"episodes\": {plan.smoke_episodes}}})`, one after "
           "the other in one process (methods sharing a pretraining reuse it). Section: " + _status_line(sec), "",
           "| method | stages | result | accuracy (episodes) | train s | eval s | total s | peak MiB |",
           "|---|---|---|---|---|---|---|---|"]
    for i in sec.items:
        res = "pass" if i.get("ok") else f"FAIL: {_item_error(i)}"
        out.append(f"| {i['method']} | {'+'.join(i.get('stages', [])) or '-'} | {res} | "
                   f"{_f(i.get('accuracy'))} ({_f(i.get('episodes'), 'd') if i.get('episodes') is not None else '-'}) | "
                   f"{_f(i.get('train_time_s'))} | {_f(i.get('eval_time_s'))} | {_f(i.get('seconds'), '.1f')} | "
                   f"{_f(i.get('peak_memory_mb'), '.0f')} |")
    return out


def _resume_report(plan: Plan, sec: Section, dev: str) -> List[str]:
    out = ["", f"## 3. Pretraining killed with SIGKILL and resumed ({dev})", "",
           f"`python -m fewshot_nsl --method M --profile smoke --image-size {plan.image_size} --device {plan.device} "
           f"--deterministic --compile off {' '.join('--set ' + o for o in resume_sets(plan))}`: run once uninterrupted; then the same command in another results folder, killed "
           "(SIGKILL) as soon as its first `.partial` checkpoint (end of epoch 1) is in the cache, and run again, "
           "which resumes from it. Compared: every tensor of the cached pretraining's `module` state dict "
           "(weights, BN running statistics and counters, `torch.equal`), its recorded train accuracy, step count "
           "and training curve. Section: " + _status_line(sec), "",
           "| method | steps | killed after s | resumed from step | tensors | identical | max abs diff | "
           "eval accuracy (uninterrupted / resumed) | result |",
           "|---|---|---|---|---|---|---|---|---|"]
    for i in sec.items:
        acc = i.get("eval_accuracy") or [None, None]
        res = "pass" if i.get("ok") else f"FAIL{': ' + _item_error(i) if _item_error(i) else ''}"
        ident = "-" if "identical" not in i else ("yes" if i["identical"] else
                                                  f"no ({i['n_differing']} differ: {', '.join(i['differing'])})")
        out.append(f"| {i['method']} | {_f(i.get('total_steps'))} | {_f(i.get('killed_after_s'), '.1f')} | "
                   f"{_f(i.get('partial_step'))} | {_f(i.get('tensors'))} | {ident} | {_f(i.get('max_abs_diff'), '.3g')} | "
                   f"{_f(acc[0])} / {_f(acc[1])} | {res} |")
    return out


def _per_s(d: Optional[Dict[str, Any]]) -> str:
    return "-" if not d else f"{d['s'] * 1000:.1f} ms ({1 / d['s']:.1f}/s)"


def _steps_report(plan: Plan, sec: Section, dev: str, px: str) -> List[str]:
    mem = "peak MiB (`max_memory_allocated`)" if dev == "CUDA" else "peak RSS MiB (process)"
    modes = ", ".join(sorted({str(i["fast_mode"]) for i in sec.items if i.get("fast_mode")})) or "-"
    out = ["", f"## 4. Training step speed and memory of every `paper` cell ({px}, {dev})", "",
           f"Paper profile settings of each cell at {px}, fp32, eager, built as a run without `--deterministic` "
           f"builds it (fast mode: {modes}); median of "
           f"{plan.step_reps} after {plan.step_warmup} warm-up, synchronised. Pretraining step: a batch of real "
           "images, network + base-class head, the profile's optimiser; episodic step: `meta_batch` training "
           "episodes of the cell's ways/shots/queries, Adam; test episode: `fit_support` + `forward` under "
           "`no_grad`. Input pipeline time is not included. Section: " + _status_line(sec), "",
           f"| cell | pretraining step (steps/s) | episodic step (steps/s) | test episode | {mem} | params |",
           "|---|---|---|---|---|---|"]
    for i in sec.items:
        name = f"{i['method']} {i['backbone']} {i['shots']}-shot"
        if not i.get("ok"):
            out.append(f"| {name} | FAIL: {_item_error(i)} | | | | |")
            continue
        peak = max(i[k]["peak_mb"] for k in ("pretrain", "episodic", "test") if k in i)
        pre = _per_s(i.get("pretrain")) + (f", batch {i['pretrain']['batch']}" if "pretrain" in i else "")
        epi = _per_s(i.get("episodic"))
        if "episodic" in i:
            e = i["episodic"]
            epi += f", {e['ways']}-way q{e['queries']} mb{e['meta_batch']}"
        out.append(f"| {name} | {pre} | {epi} | {i['test']['s']:.3f} s | {peak:.0f} | {i['params']} |")
    return out


def _projection_report(plan: Plan, sec: Section, dev: str) -> List[str]:
    proj = project(sec.items)
    unit = "GPU-hours" if dev == "CUDA" else "CPU-hours of this dry run (16 px, meaningless)"
    measured = len(proj["cells"])
    expected = len(plan.step_cells) if plan.step_cells else len(table6_cells())
    out = ["", f"## 5. Projected {unit} of the `paper` profile", "",
           "Full budgets of the paper profile: pretraining steps = epochs x ceil(38400 / batch) over the Mini-ImageNet "
           "base images, episodic steps, validation episodes (`val_every`/`val_episodes`) and 600 test episodes, "
           "each times the step time of section 4 (compute only: input pipeline, checkpoints and process start "
           "not included).", "",
           "| cell | pretraining h | episodic h | validation + test h | total h | pretraining shared |",
           "|---|---|---|---|---|---|"]
    for r in proj["cells"]:
        out.append(f"| {r['cell']} | {r['pretrain_h']:.2f} | {r['episodic_h']:.2f} | {r['eval_h']:.2f} | "
                   f"{r['hours']:.2f} | {'yes (counted once)' if r['pretraining_shared'] else '-'} |")
    scope = "the whole grid" if measured == expected and not plan.dry_run else f"the {measured} measured cells"
    out += ["", f"**Projected total of {scope}: {proj['grid_h']:.1f} h** with each shared pretraining counted once "
                f"({proj['grid_unshared_h']:.1f} h counting it in every cell); {measured} of {expected} cells "
                "measured."]
    return out


def _precision_report(plan: Plan, sec: Section, dev: str, px: str) -> List[str]:
    out = ["", f"## 6. compile on/off and precision bf16/fp32 on the dynamic NSN ({px}, {dev})", "",
           f"Dynamic NSN, CNN-4, 5-way 5-shot, paper settings with the budgets cut (`pretrain: "
           f"{json.dumps(plan.arm_pretrain)}`, head retrained for {plan.arm_head_epochs} epochs per episode), one "
           f"fresh pretraining per arm, evaluated on the first {plan.arm_episodes} fixed test episodes through "
           "`fewshot_nsl.benchmark(..., precision=P, compile=C)` (fast mode: differences within the paired CI are "
           "noise). Paired difference to fp32 eager on the same episodes. Step: a pretraining step of 64 images "
           f"(median of {plan.arm_reps} after {plan.arm_warmup} warm-up calls; the warm-up includes compilation), "
           "timed before the arm's accuracy run. The eager arms ran first in their own process (limit "
           f"{plan.timeouts['precision']:.0f} s)"
           + (f", the compiled arms after them in another (limit {plan.timeouts.get('compiled', 0):.0f} s of their "
              "own; their accuracy run's pretraining reuses the network compiled for the step)"
              if part_arms(plan, "compiled") else "") + ". Section: " + _status_line(sec), "",
           "| arm | compiled | accuracy ± 95% CI | paired diff vs fp32 eager (p) | same-accuracy episodes | "
           "pretraining + eval s | step ms | warm-up s | step peak MiB | result |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for i in sec.items:
        p = i.get("paired")
        paired = f"{p['diff']:+.2f} ± {p['diff_ci95']:.2f} ({p['p']:.2g})" if p else "-"
        same = f"{p['same_episodes']}/{plan.arm_episodes}" if p else "-"
        st = i.get("step") or {}
        wall = (f"{_f(i.get('train_time_s'), '.1f')} + {_f(i.get('eval_time_s'), '.1f')}"
                if i.get("train_time_s") is not None else "-")
        acc = f"{_f(i.get('accuracy'))} ± {_f(i.get('ci95'))}" if i.get("accuracy") is not None else "-"
        res = "pass" if i.get("ok") else f"FAIL: {_item_error(i)}"
        out.append(f"| {i['arm']} | {_f(i.get('compiled', st.get('compiled')))} | {acc} | {paired} | {same} | {wall} | "
                   f"{_f(st['s'] * 1000, '.1f') if st else '-'} | {_f(st.get('warmup_s'), '.1f')} | "
                   f"{_f(st.get('peak_mb'), '.0f')} | {res} |")
    reported = {i.get("arm") for i in sec.items}
    for precision, compile_setting in plan.arms:
        if f"{precision}_{compile_setting}" not in reported and sec.status not in ("skipped",):
            out.append(f"| {precision}_{compile_setting} | | | | | | | | | not measured: the section is "
                       f"{sec.status}{': ' + sec.error if sec.error else ''} |")
    for precision, compile_setting, why in plan.skipped_arms:
        out.append(f"| {precision}_{compile_setting} | | | | | | | | | skipped: {why} |")
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="the same code path on the CPU at tiny sizes (< ~1 min)")
    ap.add_argument("--out", help=f"markdown report file (default {DEFAULT_OUT.relative_to(ROOT)} on a GPU; "
                                  "none in a dry run)")
    ap.add_argument("--json", help="also write the raw results as JSON to this file")
    ap.add_argument("--work", help="folder for the runs' results and caches (default: a temporary folder, removed)")
    ap.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)} (default all)")
    ap.add_argument("--dataset", default="glyphs", help="dataset of every run (default glyphs)")
    ap.add_argument("--data-root", help="its folder (miniimagenet, custom)")
    ap.add_argument("--budget", type=float, help="seconds for all sections together (default 470 on a GPU, 330 in a "
                                                 "dry run); each section also has its own limit")
    ap.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--part", choices=PRECISION_PARTS, default="eager", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        if args.child == "precision":
            child_precision(load_plan(Path(args.plan)), args.part)
        else:
            CHILDREN[args.child](load_plan(Path(args.plan)))
        return 0
    names = [s.strip() for s in (args.sections or ",".join(SECTIONS)).split(",") if s.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        fail(f"unknown section(s) {', '.join(unknown)} in --sections; choose from {', '.join(SECTIONS)}")
    if args.budget is not None and not args.budget > 0:
        fail(f"--budget must be a positive number of seconds, got {args.budget}")
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        fail(f"no CUDA GPU is visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); run this on a "
             "GPU machine with the CUDA build of torch, or add --cpu-dry-run to check the script on the CPU")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    kw = {"dataset": args.dataset, "data_root": args.data_root}
    plan = dry_run_plan(str(work.resolve()), **kw) if args.cpu_dry_run else gpu_plan(str(work.resolve()), **kw)
    if args.budget is not None:
        plan.budget_s = args.budget
    plan_file = work / "plan.json"
    save_plan(plan, plan_file)
    t0 = time.perf_counter()

    def say(line: str) -> None:
        print(f"[gpu_check {time.perf_counter() - t0:5.0f} s] {line}", flush=True)

    say(f"{'CPU dry run' if plan.dry_run else 'CUDA check'}: sections {', '.join(names)}, work folder {work}")
    out = Path(args.out) if args.out else (None if plan.dry_run else DEFAULT_OUT)
    info: Dict[str, Any] = {}
    done: Dict[str, Section] = {}

    def save(sections: Dict[str, Section]) -> str:
        """Write the report (and the JSON) of the sections finished so far; return the report."""
        secs = complete(sections)
        text = report(plan, info, secs)
        if args.json:
            write_atomically(Path(args.json), json.dumps(
                {"plan": dataclasses.asdict(plan), "versions": info,
                 "sections": {k: dataclasses.asdict(v) for k, v in secs.items()},
                 "projection": project(secs["steps"].items)}, indent=1, default=str))
        if out is not None:
            try:
                write_atomically(out, text)
            except OSError as exc:
                say(f"warning: could not write the report to {out} ({exc})")
        return text

    previous = signal.signal(signal.SIGTERM, _interrupt)  # a stopped check writes what it finished
    stopped = False
    try:
        info = versions()
        run_sections(plan, plan_file, names, say, out=done, on_section=save)
    except KeyboardInterrupt:  # between sections: the running one (if any) was killed and recorded
        stopped = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    stopped = stopped or any(s.status == "interrupted" for s in done.values())
    text = save(done)
    print(text, end="")
    if out is not None:
        say(f"report written to {out}")
    if stopped:
        say("stopped: the report holds the sections finished before the stop")
        return 130
    secs = complete(done)
    ran = [s for s in secs.values() if s.status != "skipped" or s.error != "not selected (--sections)"]
    return 0 if all(s.status == "ok" for s in ran) else 1


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM handler of the parent: stop as Ctrl-C does (the running section is killed, the report written)."""
    raise KeyboardInterrupt


def complete(sections: Dict[str, Section]) -> Dict[str, Section]:
    """Every section of :data:`SECTIONS`, in order: those not in ``sections`` as "not run"."""
    return {name: sections.get(name) or Section(name, "not run", error="not reached when this report was written")
            for name in SECTIONS}


def write_atomically(path: Path, text: str) -> None:
    """``path`` holds either its previous content or ``text``, never a part (a check killed while writing)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
