"""Run a method on fixed episodes and record one accuracy per episode as it finishes.

Results go to a CSV (``episode,accuracy,correct,total,seconds,status``), appended and
flushed row by row (so a killed process loses no finished episode; fsync'ed at most every
``FSYNC_EVERY_S`` seconds and at the end, so a crash of the machine loses at most that much),
and an interrupted evaluation resumes from the first missing episode.
Before each episode the torch RNG is re-seeded from ``(seed, episode index)``, so an
episode's result does not depend on which episodes ran before it in this process.

Fairness. A method is handed the support images, the support labels and the query images of
an episode, in the episode's shuffled order (:class:`~fewshot_nsl.data.episodes.EpisodeOrder`),
and nothing else: never the query labels, nor an order they could be read from. An episode
whose logits are not all finite counts as wrong: accuracy 0, status ``nonfinite`` (so it is
counted in ``episodes_failed``), never left out of the mean.
"""
from __future__ import annotations

import csv
import os
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from .data.episodes import EpisodeList, Materialiser
from .data.store import ImageStore
from .errors import FewShotError, MethodError
from .methods.base import FewShotMethod

FIELDS = ["episode", "accuracy", "correct", "total", "seconds", "status"]
#: Seconds between fsyncs of the results CSV (an fsync costs milliseconds: per episode, a visible share of a small-image episode).
FSYNC_EVERY_S = 1.0


def read_episode_results(path: Path) -> Dict[int, Dict[str, str]]:
    """Rows already written, keyed by episode index (a torn last line is ignored)."""
    path = Path(path)
    if not path.is_file():
        return {}
    rows: Dict[int, Dict[str, str]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                if row.get("status") in ("ok", "nonfinite"):
                    rows[int(row["episode"])] = row
            except (TypeError, ValueError):
                continue
    return rows


def _repair(path: Path) -> None:
    """Drop a torn (unterminated) last line left by a kill mid-write."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])


def episode_seed(seed: int, episode: int) -> int:
    return (seed * 1_000_003 + episode) % (2**63 - 1)


def seed_torch(seed: int, device: torch.device) -> None:
    """``torch.manual_seed(seed)``, without its cost where CUDA is not in use.

    ``torch.manual_seed`` also queues a lazy seeding of CUDA, which records a stack trace
    (~2 ms, a tenth of a 32x32 ProtoNet episode on a 2-core CPU); on a CPU device with CUDA
    not initialised, seeding the CPU generator is the same thing for the method.
    """
    if device.type == "cpu" and not torch.cuda.is_initialized():
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def _method_name(method: FewShotMethod) -> str:
    return getattr(type(method), "registered_name", type(method).__name__)


def episode_accuracy(row: Dict[str, str]) -> float:
    """Accuracy (%) of one finished ``episodes.csv`` row: 0 for a ``nonfinite`` episode (counted
    as wrong; older versions wrote ``nan`` there), else its ``accuracy``."""
    return 0.0 if row.get("status") == "nonfinite" else float(row["accuracy"])


def run_episode(
    method: FewShotMethod,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    episode: int,
    error_dir: Optional[Path] = None,
    split: str = "test",
) -> torch.Tensor:
    """``fit_support`` then ``forward`` on one materialised episode under ``torch.no_grad()``.

    The method is given exactly these three tensors (the query labels stay with the caller).

    Args:
        method: the method, in eval mode.
        support_x: ``(ways*shots, 3, H, W)`` support images, in the episode's shuffled order.
        support_y: ``(ways*shots,)`` int64 support labels in ``0..ways-1``, in the same order.
        query_x: ``(n_query, 3, H, W)`` query images, in the episode's shuffled order.
        episode: index of the episode (messages).
        error_dir: where a method's traceback goes (``error.txt``); None: not kept.
        split: the episode list's split, for messages (``test episode 3``, ``val episode 3``).

    Returns:
        Logits ``(n_query, ways)`` of a real floating-point dtype.

    Raises:
        MethodError: the method raised (one line naming the method, the call and the episode;
            the traceback goes to ``error_dir/error.txt``), or returned logits of another shape
            or of a complex, boolean or integer dtype.
    """
    call = "fit_support"
    try:
        with torch.no_grad():
            method.fit_support(support_x, support_y)
            call = "forward"
            logits = method(query_x)
    except (KeyboardInterrupt, torch.OutOfMemoryError, FewShotError):
        raise
    except Exception as exc:  # a method's own bug: one line, the traceback kept in a file
        where = ""
        if error_dir is not None:
            try:
                error_dir.mkdir(parents=True, exist_ok=True)
                (error_dir / "error.txt").write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
                where = f"; traceback in {error_dir / 'error.txt'}"
            except OSError:
                pass
        msg = " ".join(str(exc).split())[:200]
        raise MethodError(f"method {_method_name(method)} raised {type(exc).__name__} in {call} on {split} episode "
                          f"{episode}: {msg}{where}; fix the method (finished episodes are kept)") from None
    problem = FewShotMethod.logits_problem(logits, len(query_x), int(support_y.max()) + 1)
    if problem:
        got, expected = problem
        raise MethodError(f"method {_method_name(method)} returned {got} from forward on {split} episode {episode}; "
                          f"{expected}; fix the method")
    return logits


def evaluate(
    method: FewShotMethod,
    store: ImageStore,
    episodes: EpisodeList,
    n_episodes: int,
    device: torch.device,
    image_size: int,
    out_csv: Path,
    seed: int = 0,
    progress: bool = True,
    indices: Optional[List[int]] = None,
    error_dir: Optional[Path] = None,
) -> List[float]:
    """Evaluate ``method`` on the first ``n_episodes`` of ``episodes`` (or on ``indices``).

    Each episode: ``fit_support`` then ``forward`` under ``torch.no_grad()`` with the method
    in eval mode (:func:`run_episode`: logits must be real floating point ``(n_query, ways)``),
    on the episode in its shuffled order (:meth:`EpisodeList.episode`). A non-finite logit marks
    the episode ``nonfinite`` and counts it as wrong (accuracy 0): a method cannot raise its
    mean by abstaining on hard episodes.

    Args:
        error_dir: where a method's traceback goes (``error.txt``); default: beside ``out_csv``.

    Returns:
        Per-episode accuracies in percent, in episode order (0 for ``nonfinite`` episodes).
    """
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    _repair(out_csv)
    done = read_episode_results(out_csv)
    todo = indices if indices is not None else list(range(min(n_episodes, len(episodes))))
    mat = Materialiser(store, image_size, device)
    method.to(device).eval()
    new_file = not out_csv.is_file() or out_csv.stat().st_size == 0
    with out_csv.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        bar = tqdm(todo, desc="evaluate", disable=not progress, unit="ep")
        last_sync = time.monotonic()
        for i in bar:
            if i in done:
                continue
            t0 = time.perf_counter()
            seed_torch(episode_seed(seed, i), mat.device)
            t = mat(episodes.episode(i))
            logits = run_episode(method, t.support_x, t.support_y, t.query_x, i, error_dir=error_dir or out_csv.parent,
                                 split=episodes.split)
            if torch.isfinite(logits).all():
                correct = int((logits.argmax(1) == t.query_y.to(logits.device)).sum())
                acc, status = 100.0 * correct / len(t.query_y), "ok"
            else:  # abstaining is not allowed: the episode counts as wrong
                correct, acc, status = 0, 0.0, "nonfinite"
            row = {
                "episode": i, "accuracy": f"{acc:.6f}", "correct": correct, "total": len(t.query_y),
                "seconds": f"{time.perf_counter() - t0:.4f}", "status": status,
            }
            writer.writerow(row)
            f.flush()  # in the OS from here on: survives a kill of this process
            if time.monotonic() - last_sync >= FSYNC_EVERY_S:
                os.fsync(f.fileno())
                last_sync = time.monotonic()
            done[i] = {k: str(v) for k, v in row.items()}
        f.flush()
        os.fsync(f.fileno())
    return [episode_accuracy(done[i]) for i in todo]
