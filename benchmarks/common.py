"""Shared helpers of the benchmark scripts: interleaved timing, ratios, settings, synthetic stores, peak memory.

Method (every script): the baseline and the candidate run in the same process, alternately
(``interleaved``), after a warm-up; a ratio is taken per repetition (candidate / baseline over
the same repetition) and reported as the median with min and max over the repetitions. This
keeps the load other processes put on a shared machine out of the ratios as far as possible.

CPU peak memory is measured in a fresh subprocess per variant: after set-up (imports, model, inputs
in memory) the kernel's peak-RSS mark is reset to the current RSS (``/proc/self/clear_refs``), the
call runs, and the figure is the peak RSS (``ru_maxrss``) minus the RSS before the call.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Marker that starts a machine-readable result line (``run_all.py`` collects them).
RESULT_PREFIX = "BENCH_RESULT "

#: ``wall`` (default): wall-clock time. ``cpu``: this process's CPU time (all its threads): with one
#: torch thread (``OMP_NUM_THREADS=1``) it is the work done, unaffected by time spent waiting for a
#: core, so ratios stay meaningful on a machine loaded by other processes (I/O waits are not counted).
CLOCK = os.environ.get("FEWSHOT_BENCH_CLOCK", "wall")


def now() -> float:
    """Seconds on the benchmark clock (see :data:`CLOCK`)."""
    return time.process_time() if CLOCK == "cpu" else time.perf_counter()


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: Dict[str, Callable[[], object]],
    reps: int,
    warmup: int = 1,
    device: torch.device = torch.device("cpu"),
    inner: int = 1,
) -> Dict[str, List[float]]:
    """Seconds per call of each function, the functions run alternately.

    Args:
        fns: name -> zero-argument callable.
        reps: repetitions; each repetition times every function once (``inner`` calls each).
        warmup: untimed calls of each function first.
        inner: calls per timing (the time is divided by ``inner``).

    Returns:
        name -> ``reps`` seconds per call, in repetition order.
    """
    for _ in range(warmup):
        for f in fns.values():
            f()
    sync(device)
    out: Dict[str, List[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        # Alternate the order too, so neither side always runs right after the other.
        for name in names if r % 2 == 0 else names[::-1]:
            f = fns[name]
            t0 = now()
            for _ in range(inner):
                f()
            sync(device)
            out[name].append((now() - t0) / inner)
    return out


def stats(values: Sequence[float]) -> Dict[str, float]:
    """``{"median", "min", "max"}`` of ``values``."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratio_stats(num: Sequence[float], den: Sequence[float]) -> Dict[str, float]:
    """Per-repetition ratios ``num[i] / den[i]``: median, min and max."""
    return stats([a / b for a, b in zip(num, den)])


def fmt_ms(values: Sequence[float]) -> str:
    s = stats(values)
    return f"{1e3 * s['median']:9.2f} ms [{1e3 * s['min']:.2f}-{1e3 * s['max']:.2f}]"


def fmt_ratio(r: Dict[str, float], digits: int = 2) -> str:
    return f"x{r['median']:.{digits}f} [{r['min']:.{digits}f}-{r['max']:.{digits}f}]"


def verdict(value: float, target: float, op: str) -> str:
    """``"MET"`` or ``"MISSED"`` for ``value <op> target`` (op one of ``<=``, ``>=``, ``<``, ``>``)."""
    ok = {"<=": value <= target, ">=": value >= target, "<": value < target, ">": value > target}[op]
    return "MET" if ok else "MISSED"


def emit(target: str, name: str, value: Dict[str, float], goal: str, met: Optional[str], **extra: object) -> None:
    """Print one machine-readable result line when ``run_all.py`` asks for them (``$FEWSHOT_BENCH_RESULTS=1``)."""
    if os.environ.get("FEWSHOT_BENCH_RESULTS") != "1":
        return
    row = {"target": target, "name": name, "value": value, "goal": goal, "met": met, **extra}
    print(RESULT_PREFIX + json.dumps(row, default=float), flush=True)


# ----------------------------------------------------------------------------- settings
def cpu_model() -> str:
    """The CPU model name (the one the suite records in every row's ``device_name``)."""
    from fewshot_nsl.provenance import device_name

    return device_name(torch.device("cpu"))


def settings(**extra: object) -> Dict[str, object]:
    """The machine and the torch settings in force (printed by every script)."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()}-core CPU ({cpu_model()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
        "cuda": torch.cuda.is_available(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "clock": CLOCK,
        **extra,
    }


def print_settings(title: str, **extra: object) -> Dict[str, object]:
    """Print the settings; first makes this process keep freed host memory as a run does
    (:func:`fewshot_nsl.host_memory.retain_freed_memory`; ``FEWSHOT_NSL_MALLOC=default`` measures without it)."""
    from fewshot_nsl.host_memory import retain_freed_memory

    s = settings(malloc=retain_freed_memory(), **extra)
    print(f"== {title}")
    print("   " + ", ".join(f"{k}={v}" for k, v in s.items()), flush=True)
    return s


# ----------------------------------------------------------------------------- data
def make_store(
    classes: int = 20,
    per_class: int = 600,
    size: int = 84,
    directory: Optional[Path] = None,
    seed: int = 0,
    split: str = "test",
):
    """A memory-mapped synthetic store shaped like the Mini-ImageNet test split (20 x 600 x 84x84x3 uint8).

    Written to ``directory`` (a fresh temporary folder by default) and loaded back with
    :meth:`ImageStore.load`, so reads go through a memory map exactly as with a cached dataset.
    """
    from fewshot_nsl.data.store import ImageStore

    directory = Path(directory or tempfile.mkdtemp(prefix="fewshot_bench_store_"))
    path = directory / f"store_{classes}x{per_class}_{size}"
    if not ImageStore.is_cached(path):
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, size=(classes * per_class, size, size, 3), dtype=np.uint8)
        labels = np.repeat(np.arange(classes), per_class)
        store = ImageStore("bench", images, labels, [f"c{i:03d}" for i in range(classes)], [split] * classes)
        store.save(path)
    return ImageStore.load(path)


# ----------------------------------------------------------------------------- memory
def _status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark to its current RSS (Linux ``/proc/self/clear_refs``); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb(fn: Callable[[], object]) -> float:
    """Peak RSS during ``fn`` minus the RSS just before it (MiB); run it in a fresh process.

    The peak mark is first reset to the current RSS (``clear_refs``), so set-up transients (imports,
    building the inputs) do not hide the call's own peak; where that is unsupported, the rise of
    ``ru_maxrss`` over the call is returned (a lower bound).
    """
    if reset_peak_rss():
        # clear_refs resets VmHWM, not getrusage's ru_maxrss (the lifetime peak, often set by the imports)
        base = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - base) / 1024  # type: ignore[operator]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def run_child(args: Sequence[str], timeout: float = 1800) -> Dict[str, object]:
    """Run ``python <args>`` and parse the JSON on its last stdout line."""
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"
        raise RuntimeError(f"{' '.join(args)} failed: {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def quiet_learn2learn():
    """Import learn2learn without its optional-dependency notices on stderr."""
    import contextlib
    import io
    import warnings

    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import learn2learn

    return learn2learn


# ----------------------------------------------------------------------------- MAML meta-training step
def random_episodes(
    count: int, ways: int = 5, shots: int = 5, queries: int = 15, size: int = 84, seed: int = 1,
    device: torch.device = torch.device("cpu"),
) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``count`` episodes ``(support_x, support_y, query_x, query_y)`` of seeded uniform random images.

    Shapes: ``support_x (ways*shots, 3, size, size)``, ``query_x (ways*queries, 3, size, size)``; labels
    ``0..ways-1``, each repeated ``shots`` (``queries``) times. The same seed gives the same episodes.
    """
    g = torch.Generator().manual_seed(seed)
    episodes = []
    for _ in range(count):
        sy = torch.arange(ways).repeat_interleave(shots)
        qy = torch.arange(ways).repeat_interleave(queries)
        sx = torch.rand(len(sy), 3, size, size, generator=g)
        qx = torch.rand(len(qy), 3, size, size, generator=g)
        episodes.append(tuple(t.to(device) for t in (sx, sy, qx, qy)))
    return episodes


def l2l_maml_episode_loss(maml, inner_steps: int) -> Callable[..., torch.Tensor]:
    """``(support_x, support_y, query_x, query_y) -> query loss`` of ``learn2learn.algorithms.MAML`` ``maml``.

    A clone of ``maml`` takes ``inner_steps`` steps of the support cross-entropy; the query cross-entropy
    of the adapted clone is returned (differentiable w.r.t. ``maml``'s parameters).
    """
    import torch.nn.functional as F

    def episode_loss(sx, sy, qx, qy):
        learner = maml.clone()
        for _ in range(inner_steps):
            learner.adapt(F.cross_entropy(learner(sx), sy))
        return F.cross_entropy(learner(qx), qy)

    return episode_loss


def meta_training_step(
    episode_loss: Callable[..., torch.Tensor], params: Sequence[torch.Tensor], episodes: Sequence[tuple], lr: float = 1e-3,
) -> Callable[[], float]:
    """A zero-argument meta-training step over ``episodes``: the mean episode loss, ``backward``, one Adam step.

    Returns:
        The step; each call returns the mean loss (before the Adam update).
    """
    opt = torch.optim.Adam(params, lr=lr)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for ep in episodes:
            loss = episode_loss(*ep) / len(episodes)
            loss.backward()
            total += float(loss.detach())
        opt.step()
        return total

    return step
