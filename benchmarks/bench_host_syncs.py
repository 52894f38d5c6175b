"""Host synchronisations per training step and per evaluation episode (issue 27), counted on CPU.

A call that reads a tensor's value on the host (``Tensor.item``, ``tolist``, ``__bool__``,
``__float__``, ``__int__``, ``__index__``, ``cpu``) or ``torch.cuda.synchronize`` makes the host wait
for the device when the tensor is on a GPU: the GPU then idles while the host prepares the next
kernels. This script patches those calls (:class:`SyncCounter`, for the length of each run only),
runs the suite's own loops on CPU (tiny synthetic store, 32 px: the count does not depend on the
size) and attributes every call to the innermost frame in the suite's code (``fewshot_nsl/``,
``baselines/``):

* ``pretraining`` (:func:`fewshot_nsl.training.pretrain`, ``nearest_neighbor``'s CNN-4, batch 64,
  augmentation on), ``meta-training`` (:func:`~fewshot_nsl.training.meta_train`, meta-batch 1) and
  ``evaluation`` (:func:`fewshot_nsl.evaluation.evaluate`), each with the methods given;
* per step (episode) = ``(count(N2) - count(N1)) / (N2 - N1)`` of two runs of ``N1`` and ``N2`` steps
  (episodes), so set-up and the end of a run cancel; the curve is kept at one row per run
  (``curves.POINTS = 1``), so no logging interval falls between ``N1`` and ``N2`` in training;
* columns: ``outside logging`` = every counted call but those below (target: 0); ``logging/flush``
  = reads of values kept on the device, once per curve row (``IntervalLog.flush``) or per batch of
  result rows (``_PendingRows.write``), amortised per step; ``host-only`` = reads of tensors that
  are on the host whatever the device (the pretraining augmentation's draws from its CPU
  ``torch.Generator``: ``_augment``/``_draw_augmentation``; the optimisers' step counters, CPU tensors
  unless ``capturable``/``fused``: ``torch.optim`` ``_get_value``); ``of which method`` = the part made by
  the method's own code (``baselines/``, ``fewshot_nsl/methods/``), not the harness.

``numpy()`` is not counted: it refuses a CUDA tensor, so it never synchronises (the device
code calls ``cpu()`` first, which is counted).

Runs against any checkout of the suite (it uses only ``pretrain``, ``meta_train``, ``evaluate``
and the config helpers): for the "before" figures, copy it into an older checkout and run it
there (``python benchmarks/bench_host_syncs.py`` prints which package it imported).

Usage::

    python benchmarks/bench_host_syncs.py [--methods protonet,maml] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(Path(__file__).resolve().parent))

#: Tensor methods whose call reads a value on the host (a device synchronisation for a GPU tensor).
SYNC_CALLS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu")
#: Functions (of the suite, or the innermost function of the call) whose counted calls read tensors that are on
#: the host on every device: the pretraining augmentation's draws from its CPU generator, and the optimisers'
#: step counters (``torch.optim.optimizer._get_value``: torch keeps ``step`` on the CPU unless capturable/fused).
HOST_ONLY_FUNCTIONS = {"_augment", "_draw_augmentation", "_get_value"}
#: Functions that read values kept on the device once per logging interval / batch of result rows.
LOGGING_FUNCTIONS = {"flush", "write"}

Site = Tuple[str, str, int, str, bool, str]  # (file in the checkout, function, line, call, main thread?, innermost function)


class SyncCounter:
    """Counts host-synchronising tensor calls by call site while active (a context manager).

    Each call is attributed to the innermost frame whose file is in the suite's code (``fewshot_nsl/``,
    ``baselines/`` of the checkout imported), or to ``(other)``. The patches are removed on exit.
    """

    def __init__(self) -> None:
        import fewshot_nsl

        self.roots = [str(Path(fewshot_nsl.__file__).resolve().parent), str(Path(fewshot_nsl.__file__).resolve().parents[1] / "baselines")]
        self.base = str(Path(fewshot_nsl.__file__).resolve().parents[1])
        self.counts: Counter = Counter()
        self._saved: Dict[str, Optional[Callable]] = {}
        self._lock = threading.Lock()
        self._busy = threading.local()

    def _site(self, call: str) -> Site:
        frame = sys._getframe(2)
        inner, main = frame.f_code.co_name, threading.current_thread() is threading.main_thread()
        while frame is not None:
            name = frame.f_code.co_filename
            if any(name.startswith(r) for r in self.roots):
                return (name[len(self.base) + 1:], frame.f_code.co_name, frame.f_lineno, call, main, inner)
            frame = frame.f_back
        return ("(other)", "", 0, call, main, inner)

    def _wrap(self, call: str, real: Callable) -> Callable:
        def counted(*args, **kwargs):
            if not getattr(self._busy, "on", False):  # a call made by a counted call is not counted again
                self._busy.on = True
                try:
                    site = self._site(call)
                    with self._lock:
                        self.counts[site] += 1
                finally:
                    self._busy.on = False
            return real(*args, **kwargs)

        return counted

    def __enter__(self) -> "SyncCounter":
        for call in SYNC_CALLS:
            self._saved[call] = torch.Tensor.__dict__.get(call)
            setattr(torch.Tensor, call, self._wrap(call, getattr(torch.Tensor, call)))
        self._saved["cuda.synchronize"] = torch.cuda.synchronize
        torch.cuda.synchronize = self._wrap("cuda.synchronize", torch.cuda.synchronize)
        return self

    def __exit__(self, *exc: object) -> None:
        for call in SYNC_CALLS:
            if self._saved[call] is None:
                delattr(torch.Tensor, call)
            else:
                setattr(torch.Tensor, call, self._saved[call])
        torch.cuda.synchronize = self._saved["cuda.synchronize"]  # type: ignore[assignment]


def classify(site: Site) -> str:
    """``host-only``, ``logging`` or ``step`` (a synchronisation in every step or episode)."""
    function, inner = site[1], site[5]
    if function in HOST_ONLY_FUNCTIONS or inner in HOST_ONLY_FUNCTIONS:
        return "host-only"
    if function in LOGGING_FUNCTIONS:
        return "logging"
    return "step"


def is_method(site: Site) -> bool:
    return site[0].startswith(("baselines", "fewshot_nsl/methods"))


# ----------------------------------------------------------------------------- the runs
def make_store(size: int):
    """A synthetic store with train/val/test classes (20 x 60, 5 x 40, 10 x 40 images of ``size`` px)."""
    from fewshot_nsl.data.store import ImageStore

    rng = np.random.default_rng(0)
    per = [60] * 20 + [40] * 5 + [40] * 10
    splits = ["train"] * 20 + ["val"] * 5 + ["test"] * 10
    images = rng.integers(0, 256, size=(sum(per), size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(len(per)), per)
    return ImageStore("bench", images, labels, [f"c{i:02d}" for i in range(len(per))], splits, synthetic=True)


def config(method: str, size: int, tmp: Path, **sections):
    from fewshot_nsl.config import resolve_config

    return resolve_config({"method": method, "profile": "smoke", "dataset": "glyphs", "image_size": size,
                           "device": "cpu", "cache_dir": str(tmp / "cache"), "results_dir": str(tmp / "results"),
                           **sections})


def count_pretraining(store, size: int, steps: int, tmp: Path) -> Counter:
    from fewshot_nsl.runner import build_method, conv_spec_of
    from fewshot_nsl.training import pretrain, set_seed

    cfg = config("nearest_neighbor", size, tmp,
                 pretrain={"epochs": 1, "batch_size": 64, "max_steps": steps, "augment": True})
    set_seed(0)
    method = build_method(cfg)
    with SyncCounter() as c:
        pretrain(method, store, cfg, torch.device("cpu"), conv_spec_of(cfg), tmp / f"cache{steps}", progress=False)
    return c.counts


def count_meta_training(store, size: int, method_name: str, steps: int, tmp: Path) -> Counter:
    from fewshot_nsl.runner import build_method
    from fewshot_nsl.training import meta_train, set_seed

    cfg = config(method_name, size, tmp,
                 episodic={"steps": steps, "meta_batch": 1, "queries": 5, "checkpoint_every": 10_000})
    set_seed(0)
    method = build_method(cfg)
    with SyncCounter() as c:
        meta_train(method, store, cfg, torch.device("cpu"), tmp / f"{method_name}_{steps}.pt", progress=False)
    return c.counts


def count_evaluation(store, size: int, method_name: str, episodes: int, tmp: Path) -> Counter:
    from fewshot_nsl.data.episodes import episode_list_for_store
    from fewshot_nsl.evaluation import evaluate
    from fewshot_nsl.runner import build_method
    from fewshot_nsl.training import set_seed

    cfg = config(method_name, size, tmp)
    lst = episode_list_for_store(store, "test", 5, 5, 15, n=episodes, seed=0)
    set_seed(0)
    method = build_method(cfg)
    with SyncCounter() as c:
        evaluate(method, store, lst, episodes, torch.device("cpu"), size, tmp / f"{method_name}_{episodes}.csv",
                 progress=False, batch_episodes=1)  # per episode: what the counts are per
    return c.counts


def per_step(small: Counter, large: Counter, n_small: int, n_large: int) -> Dict[Site, float]:
    """Calls per step of each site: the difference of two runs over the difference of their lengths."""
    return {s: (large[s] - small[s]) / (n_large - n_small) for s in set(small) | set(large) if large[s] != small[s]}


def report(title: str, unit: str, rates: Dict[Site, float], fixed: Counter) -> Dict[str, float]:
    """Print one loop's figures; returns the per-step totals by class."""
    totals = {k: sum(v for s, v in rates.items() if classify(s) == k) for k in ("step", "logging", "host-only")}
    method = sum(v for s, v in rates.items() if classify(s) == "step" and is_method(s))
    print(f"\n-- {title}: synchronising calls per {unit}")
    print(f"   outside logging {totals['step']:6.2f} (harness {totals['step'] - method:.2f}, method {method:.2f})   "
          f"logging/flush {totals['logging']:5.3f}   host-only {totals['host-only']:5.2f}   "
          f"[per run, outside the {unit}s: {sum(fixed.values()):.0f}]")
    harness = totals["step"] - method
    try:
        from common import emit, verdict

        emit("27", f"host syncs per {unit} in the harness, {title.split(':')[0]}", {"median": harness, "min": harness,
             "max": harness}, "0 outside logging", verdict(harness, 0.0, "<="), method=method, logging=totals["logging"])
    except ImportError:
        pass
    for site, v in sorted(rates.items(), key=lambda kv: (-kv[1], kv[0])):
        path, function, line, call, main, inner = site
        via = f" via {inner}" if inner != function else ""
        print(f"     {v:6.3f}  {classify(site):9s} {call:16s} {path}:{line} ({function}{via})"
              f"{'' if main else ' [worker thread]'}")
    return {**totals, "method": method}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="protonet,maml", help="methods of the meta-training and evaluation counts")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", default="3,11", help="N1,N2 training steps")
    p.add_argument("--episodes", default="16,48", help="N1,N2 evaluation episodes")
    p.add_argument("--quick", action="store_true", help="fewer steps and episodes, ProtoNet only (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.methods, args.steps, args.episodes, args.size = "protonet", "2,4", "4,20", 16
    torch.set_num_threads(1)
    import fewshot_nsl
    from fewshot_nsl import curves

    try:
        from common import print_settings

        print_settings("bench_host_syncs: issue 27, host synchronisations per step")
    except ImportError:
        pass
    print(f"   package: {Path(fewshot_nsl.__file__).parent}")
    curves.POINTS = 1  # one curve row per run: no logging interval between the N1-th and the N2-th step
    n1, n2 = (int(v) for v in args.steps.split(","))
    e1, e2 = (int(v) for v in args.episodes.split(","))
    store = make_store(args.size)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        a, b = count_pretraining(store, args.size, n1, tmp), count_pretraining(store, args.size, n2, tmp)
        rates = per_step(a, b, n1, n2)
        report(f"pretraining (nearest_neighbor CNN-4, batch 64, augment, {args.size} px)", "step", rates,
               Counter({s: a[s] - n1 * rates.get(s, 0) for s in a}))
        for name in args.methods.split(","):
            a, b = (count_meta_training(store, args.size, name, n, tmp) for n in (n1, n2))
            rates = per_step(a, b, n1, n2)
            report(f"meta-training ({name}, meta-batch 1, 5-way 5-shot 5-query)", "step", rates,
                   Counter({s: a[s] - n1 * rates.get(s, 0) for s in a}))
        for name in args.methods.split(","):
            a, b = (count_evaluation(store, args.size, name, n, tmp) for n in (e1, e2))
            rates = per_step(a, b, e1, e2)
            report(f"evaluation ({name}, 5-way 5-shot 15-query, untrained)", "episode", rates,
                   Counter({s: a[s] - e1 * rates.get(s, 0) for s in a}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
