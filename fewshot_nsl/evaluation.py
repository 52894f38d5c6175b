"""Run a method on fixed episodes and record one accuracy per episode as it finishes.

Results go to a CSV (``episode,accuracy,correct,total,seconds,status``), one row per episode,
appended in small batches: an episode's correct count and finiteness stay on the device until
its batch is written (every ``ROWS_PER_FLUSH`` episodes or ``FSYNC_EVERY_S`` seconds, whichever
comes first, at the end, and when the evaluation is interrupted or fails), so the harness
synchronises with the device once per batch, not once per episode. A killed process loses at
most the rows of the batch not yet written (recomputed, identically, on resume); the file is
fsync'ed at most every ``FSYNC_EVERY_S`` seconds and at the end, so a crash of the machine loses
at most that much. An interrupted evaluation resumes from the first missing episode.
The next episode is gathered from the store in a background thread while the current one runs
(:mod:`fewshot_nsl.data.prefetch`).
Before each episode the torch RNG is re-seeded from ``(seed, episode index)``, so an
episode's result does not depend on which episodes ran before it in this process.

Fairness. A method is handed the support images, the support labels and the query images of
an episode, in the episode's shuffled order (:class:`~fewshot_nsl.data.episodes.EpisodeOrder`),
and nothing else: never the query labels, nor an order they could be read from. An episode
whose logits are not all finite counts as wrong: accuracy 0, status ``nonfinite`` (so it is
counted in ``episodes_failed``), never left out of the mean.
"""
from __future__ import annotations

import contextlib
import csv
import os
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.episodes import EpisodeList, EpisodeTensors, Materialiser, StagedEpisode
from .data.prefetch import Prefetcher, stages
from .data.store import ImageStore
from .embedding_cache import EmbeddingCache
from .errors import FewShotError, MethodError
from .methods.base import FewShotMethod
from .methods.batched import auto_batch_episodes, episode_seed, seed_torch
from .precision import autocast

FIELDS = ["episode", "accuracy", "correct", "total", "seconds", "status"]
#: Seconds between fsyncs of the results CSV (an fsync costs milliseconds: per episode, a visible share of a small-image episode).
FSYNC_EVERY_S = 1.0
#: Most finished episodes kept on the device before their rows are written (one host synchronisation per write).
ROWS_PER_FLUSH = 16


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


def _method_name(method: FewShotMethod) -> str:
    return getattr(type(method), "registered_name", type(method).__name__)


def episode_accuracy(row: Dict[str, str]) -> float:
    """Accuracy (%) of one finished ``episodes.csv`` row: 0 for a ``nonfinite`` episode (counted
    as wrong; older versions wrote ``nan`` there), else its ``accuracy``."""
    return 0.0 if row.get("status") == "nonfinite" else float(row["accuracy"])


def _method_error(method: FewShotMethod, exc: BaseException, call: str, where: str, error_dir: Optional[Path],
                  kept_note: str = "finished episodes are kept") -> str:
    """One line for a method's own exception (the traceback goes to ``error_dir/error.txt`` when given);
    ``kept_note`` says what a rerun after the fix keeps."""
    kept = ""
    if error_dir is not None:
        try:
            error_dir.mkdir(parents=True, exist_ok=True)
            (error_dir / "error.txt").write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
            kept = f"; traceback in {error_dir / 'error.txt'}"
        except OSError:
            pass
    msg = " ".join(str(exc).split())[:200]
    return (f"method {_method_name(method)} raised {type(exc).__name__} in {call} on {where}: {msg}{kept}; "
            f"fix the method ({kept_note})")


def run_episode(
    method: FewShotMethod,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    query_x: torch.Tensor,
    episode: int,
    error_dir: Optional[Path] = None,
    split: str = "test",
    ways: Optional[int] = None,
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
        ways: the episode's number of classes, to check the logits' shape against; None: read from
            ``support_y`` (``max + 1``: a host synchronisation where the labels are on a GPU).

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
        raise MethodError(_method_error(method, exc, call, f"{split} episode {episode}", error_dir)) from None
    problem = FewShotMethod.logits_problem(logits, len(query_x), int(support_y.max()) + 1 if ways is None else ways)
    if problem:
        got, expected = problem
        raise MethodError(f"method {_method_name(method)} returned {got} from forward on {split} episode {episode}; "
                          f"{expected}; fix the method")
    return logits


class EpisodeBatch(NamedTuple):
    """``E`` materialised episodes of one shape, stacked.

    Attributes:
        support_x: ``(E, S, 3, H, W)``; support_y: ``(E, S)`` int64; query_x: ``(E, Q, 3, H, W)``;
        query_y: ``(E, Q)`` int64; ways: classes per episode.
        support_ids: ``(E, S)`` and query_ids ``(E, Q)``: the images' store indices on the host (None where
            unknown), for :class:`~fewshot_nsl.embedding_cache.EmbeddingCache`.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    ways: int
    support_ids: Optional[np.ndarray] = None
    query_ids: Optional[np.ndarray] = None


def load_batch(mat: Materialiser, staged: Sequence[StagedEpisode]) -> Optional[EpisodeBatch]:
    """Stack staged episodes into one :class:`EpisodeBatch` on the device (one host-to-device copy of all
    their images, support images first); None when they differ in support size, query size or ways."""
    if len({(len(t.support_y), len(t.query_y), t.ways) for t in staged}) != 1:
        return None
    e, n_s, n_q, ways = len(staged), len(staged[0].support_y), len(staged[0].query_y), staged[0].ways
    raw = torch.cat([t.images[:n_s] for t in staged] + [t.images[n_s:] for t in staged])
    x = mat.to_device(raw.pin_memory() if mat.pin_memory else raw)  # (E*(S+Q), 3, H, W)
    labels = torch.stack([torch.cat([t.support_y, t.query_y]) for t in staged]).to(mat.device, non_blocking=True)
    support_x = x[: e * n_s].unflatten(0, (e, n_s))
    query_x = x[e * n_s:].unflatten(0, (e, n_q))
    ids = np.stack([t.image_ids for t in staged]) if all(t.image_ids is not None for t in staged) else None
    return EpisodeBatch(support_x, labels[:, :n_s], query_x, labels[:, n_s:], ways,
                        None if ids is None else ids[:, :n_s], None if ids is None else ids[:, n_s:])


def run_episodes(
    method: FewShotMethod,
    batch: EpisodeBatch,
    episodes: Sequence[int],
    seeds: Sequence[int],
    error_dir: Optional[Path] = None,
    split: str = "test",
    cache: Optional[EmbeddingCache] = None,
) -> torch.Tensor:
    """:meth:`FewShotMethod.evaluate_episodes` on one batch under ``torch.no_grad()`` (the batched twin of
    :func:`run_episode`: the method is given the support images, support labels and query images only).
    With ``cache`` (of the method's :meth:`~FewShotMethod.image_embedding`) and the batch's image indices,
    :meth:`~FewShotMethod.evaluate_embedded` of the images' embeddings instead, each distinct image embedded once.

    Returns:
        Logits ``(E, n_query, ways)`` of a real floating-point dtype.

    Raises:
        MethodError: the method raised (one line naming the episodes; the traceback goes to
            ``error_dir/error.txt``) or returned logits of another shape or dtype.
    """
    where = f"{split} episodes {episodes[0]}-{episodes[-1]}"
    try:
        with torch.no_grad():
            if cache is not None and batch.support_ids is not None:
                support_f, query_f = cache.features(batch.support_x, batch.query_x, batch.support_ids, batch.query_ids)
                logits = method.evaluate_embedded(support_f, batch.support_y, query_f, seeds, batch.ways)
            else:
                logits = method.evaluate_episodes(batch.support_x, batch.support_y, batch.query_x, seeds, batch.ways)
    except (KeyboardInterrupt, torch.OutOfMemoryError, FewShotError):
        raise
    except Exception as exc:
        raise MethodError(_method_error(method, exc, "evaluate_episodes", where, error_dir)) from None
    e, n_q = batch.query_x.shape[:2]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or len(logits) != e:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise MethodError(f"method {_method_name(method)} returned logits of shape {got} from evaluate_episodes on "
                          f"{where}; expected (episodes, n_query, ways) = ({e}, {n_q}, {batch.ways}); fix the method")
    problem = FewShotMethod.logits_problem(logits[0], n_q, batch.ways)
    if problem:
        got, expected = problem
        raise MethodError(f"method {_method_name(method)} returned {got} per episode from evaluate_episodes on "
                          f"{where}; {expected}; fix the method")
    return logits


def resolve_batch_episodes(method: FewShotMethod, setting: Union[str, int], device: torch.device, n_episodes: int,
                           support: int, queries: int, image_size: int) -> int:
    """Episodes per call: 1 (the per-episode path) for a method without :meth:`FewShotMethod.supports_batched_evaluation`;
    else ``setting``, or for ``"auto"`` as many as fit the memory budget (:func:`~fewshot_nsl.methods.batched.auto_batch_episodes`)."""
    if not method.supports_batched_evaluation():
        return 1
    if setting == "auto":
        return auto_batch_episodes(method.episode_bytes(support, queries, image_size), device, n_episodes)
    return max(1, min(int(setting), max(1, n_episodes)))


class _PendingRows:
    """Finished episodes whose results are still on the device, written to the CSV in one batch.

    Args:
        f: the results CSV, open for appending.
        writer: its ``csv.DictWriter`` over :data:`FIELDS`.
    """

    def __init__(self, f: IO[str], writer: csv.DictWriter) -> None:
        self.f, self.writer = f, writer
        self.episodes: List[int] = []
        self.totals: List[int] = []
        self.seconds: List[float] = []
        self.correct: List[torch.Tensor] = []  # 0-d int64, on the device; 0 for a non-finite episode
        self.finite: List[torch.Tensor] = []  # 0-d bool, on the device
        self.last_write = self.last_sync = time.monotonic()

    def add(self, episode: int, logits: torch.Tensor, query_y: torch.Tensor, seconds: float) -> None:
        """Score one episode on the device (no host synchronisation).

        Args:
            logits: ``(n_query, ways)`` real floating point.
            query_y: ``(n_query,)`` int64 answers.
            seconds: wall time since the previous episode finished, its data time included (on a GPU, the time
                to queue its work: the device may still be running it).
        """
        finite = torch.isfinite(logits).all()
        correct = (logits.argmax(1) == query_y.to(logits.device)).sum()
        self.episodes.append(episode)
        self.totals.append(len(query_y))
        self.seconds.append(seconds)
        self.correct.append(torch.where(finite, correct, torch.zeros_like(correct)))  # abstaining counts as wrong
        self.finite.append(finite)

    def due(self) -> bool:
        """Whether the batch is to be written now (``ROWS_PER_FLUSH`` rows, or ``FSYNC_EVERY_S`` since the last write)."""
        return len(self.episodes) >= ROWS_PER_FLUSH or time.monotonic() - self.last_write >= FSYNC_EVERY_S

    def write(self, done: Dict[int, Dict[str, str]], fsync: bool = False) -> None:
        """Read the batch from the device (one transfer), append its rows and flush them to the OS (from there
        they survive a kill of this process); fsync at most every ``FSYNC_EVERY_S`` seconds, or now if ``fsync``."""
        if self.episodes:
            correct, finite = torch.stack([torch.stack(self.correct), torch.stack(self.finite).long()]).tolist()  # one sync
            for i, c, ok, total, sec in zip(self.episodes, correct, finite, self.totals, self.seconds):
                row = {"episode": i, "accuracy": f"{100.0 * c / total if ok else 0.0:.6f}", "correct": c,
                       "total": total, "seconds": f"{sec:.4f}", "status": "ok" if ok else "nonfinite"}
                self.writer.writerow(row)
                done[i] = {k: str(v) for k, v in row.items()}
            self.f.flush()
            self.episodes, self.totals, self.seconds, self.correct, self.finite = [], [], [], [], []
        self.last_write = time.monotonic()
        if fsync or self.last_write - self.last_sync >= FSYNC_EVERY_S:
            os.fsync(self.f.fileno())
            self.last_sync = time.monotonic()


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
    precision: str = "fp32",
    batch_episodes: Union[str, int] = "auto",
    info: Optional[Dict[str, object]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> List[float]:
    """Evaluate ``method`` on the first ``n_episodes`` of ``episodes`` (or on ``indices``).

    With ``precision`` ``bf16`` / ``fp16`` the method runs under autocast (:func:`fewshot_nsl.precision.autocast`).

    Each episode: ``fit_support`` then ``forward`` under ``torch.no_grad()`` with the method
    in eval mode (:func:`run_episode`: logits must be real floating point ``(n_query, ways)``),
    on the episode in its shuffled order (:meth:`EpisodeList.episode`). A non-finite logit marks
    the episode ``nonfinite`` and counts it as wrong (accuracy 0): a method cannot raise its
    mean by abstaining on hard episodes.

    A method that declares :meth:`~FewShotMethod.supports_batched_evaluation` is evaluated ``batch_episodes``
    episodes per call instead (:meth:`~FewShotMethod.evaluate_episodes`, :func:`run_episodes`): the same
    per-episode logits up to floating-point rounding, each episode with its own seed; its rows are written
    after every batch, so a killed evaluation loses at most the batch in flight. An episode's ``seconds`` is
    then its batch's time divided by the batch's episodes.

    The next episode (or batch) is materialised in a background thread while the method runs on the current
    one (:class:`~fewshot_nsl.data.prefetch.Prefetcher`); scores stay on the device and rows are
    written in batches (:data:`ROWS_PER_FLUSH`, :data:`FSYNC_EVERY_S`), so the harness itself
    synchronises with the device once per batch. Finished episodes are written before an exception
    (a method's error, Ctrl-C) leaves.

    Args:
        error_dir: where a method's traceback goes (``error.txt``); default: beside ``out_csv``.
        batch_episodes: episodes per call for a method with batched evaluation: ``"auto"`` (by memory,
            :func:`resolve_batch_episodes`) or a number (1: the per-episode path).
        info: filled with ``batch_episodes`` (what ran: 1 for the per-episode path) and, when the batched path
            gave way to the per-episode one, ``batched_fallback`` (why).
        log: where a ``warning:`` line goes (default: stderr).

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
    missing = [i for i in todo if i not in done]
    first = episodes.episodes[missing[0]] if missing else None
    n_support = sum(len(r) for r in first.support) if first is not None else 0
    n_query = sum(len(r) for r in first.query) if first is not None else 0
    with torch.no_grad(), autocast(precision, mat.device):  # a method's size probe runs as its evaluation will
        per_call = resolve_batch_episodes(method, batch_episodes, mat.device, len(missing), n_support, n_query,
                                          image_size)
    if info is not None:
        info["batch_episodes"] = per_call
    error_dir = error_dir or out_csv.parent
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    with out_csv.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        rows = _PendingRows(f, writer)
        bar = tqdm(total=len(todo), initial=len(todo) - len(missing), desc="evaluate", disable=not progress, unit="ep")
        try:
            if per_call > 1:
                _evaluate_batched(method, mat, episodes, missing, per_call, seed, precision, error_dir, rows, done, bar,
                                  info if info is not None else {}, log)
            else:
                _evaluate_each(method, mat, episodes, missing, seed, precision, error_dir, rows, done, bar)
        except BaseException:
            try:  # keep the episodes that finished before the error or the interrupt
                rows.write(done, fsync=True)
            except Exception:
                pass
            raise
        finally:
            bar.close()
        rows.write(done, fsync=True)
    return [episode_accuracy(done[i]) for i in todo]


def _seeded_episode(method: FewShotMethod, t, episode: int, ways: int, seed: int, precision: str,
                    error_dir: Path, split: str) -> torch.Tensor:
    """One materialised episode ``t`` the per-episode way: the RNG seeded with the episode's seed, then
    :func:`run_episode` under the evaluation's autocast. Returns logits ``(n_query, ways)``."""
    seed_torch(episode_seed(seed, episode), t.support_x.device)
    with autocast(precision, t.support_x.device):
        return run_episode(method, t.support_x, t.support_y, t.query_x, episode, error_dir=error_dir, split=split,
                           ways=ways)


def _evaluate_each(method: FewShotMethod, mat: Materialiser, episodes: EpisodeList, missing: List[int], seed: int,
                   precision: str, error_dir: Path, rows: _PendingRows, done: Dict[int, Dict[str, str]], bar) -> None:
    """The per-episode path of :func:`evaluate`: ``fit_support`` / ``forward`` per episode."""
    prepare, finish = stages(lambda i: mat.stage(episodes.episode(i)), mat.load)
    with Prefetcher(missing, prepare, finish) as tensors:
        t0 = time.perf_counter()
        for i, t in zip(missing, tensors):  # an episode's seconds: from the previous one's end (data time included)
            logits = _seeded_episode(method, t, i, len(episodes.episodes[i].classes), seed, precision, error_dir,
                                     episodes.split)
            rows.add(i, logits, t.query_y, time.perf_counter() - t0)
            t0 = time.perf_counter()
            bar.update(1)
            if rows.due():
                rows.write(done)


#: How far a batched episode's logits may be from the per-episode path's, relative to their largest magnitude (at
#: least 1): rounding differences (float32, TF32, bf16 autocast, through a few hundred optimiser steps) stay far
#: below it; a batched path that mixes up episodes, statistics or draws moves logits by their own magnitude.
LOGITS_GAP_TOLERANCE = 0.05


def logits_gap(batched: torch.Tensor, single: torch.Tensor) -> Tuple[float, float]:
    """``(max |batched - single|, tolerance)`` for one episode's logits ``(Q, ways)`` from the two paths; entries
    non-finite in one and not the other make the gap infinite (one host synchronisation: used once per evaluation)."""
    dtype = torch.float64 if torch.float64 in (batched.dtype, single.dtype) else torch.float32
    a, b = batched.detach().to(dtype), single.detach().to(dtype)
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return float("inf"), 0.0
    finite = torch.isfinite(b)
    if not finite.any():
        return 0.0, 0.0
    gap = (a - b).abs()[finite].max().item()
    scale = max(1.0, b.abs()[finite].max().item())
    return gap, LOGITS_GAP_TOLERANCE * scale


#: How far the two paths' float64 logits may be apart, relative to their largest magnitude (at least 1), for
#: :func:`float64_check` to call them the same computation: float64 rounding, even amplified a millionfold through
#: an inner loop, stays below it.
FLOAT64_GAP_TOLERANCE = 1e-6
#: Episodes of a batch that :func:`float64_check` runs again (two, so a batched path that swaps episodes shows).
FLOAT64_CHECK_EPISODES = 2


class Float64Check(NamedTuple):
    """What :func:`float64_check` found: ``agrees``; ``gap``: max |batched - per-episode| float64 logit difference
    over the episodes it ran (``inf`` when it could not run: ``error`` says why); ``reference``: the first
    episode's per-episode float64 logits ``(Q, ways)`` (None when it could not run)."""

    agrees: bool
    gap: float
    reference: Optional[torch.Tensor]
    error: str = ""

    def detail(self, single: Optional[torch.Tensor]) -> str:
        """One clause for a message or ``evaluation.json``; with ``single`` (the first episode's logits from the
        per-episode path at the evaluation's precision, ``(Q, ways)``), how far that path itself is from float64."""
        if self.reference is None:
            return f"the float64 check could not run ({self.error})"
        text = f"in float64 the paths differ by {self.gap:.3g}"
        if single is not None:
            own = (single.to(self.reference) - self.reference).abs().max().item()
            text += f" (the per-episode path's own result is {own:.3g} from float64)"
        return text + (": the method amplifies rounding, batched kept" if self.agrees else "")


@contextlib.contextmanager
def in_float64(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` with its floating-point parameters and buffers in float64 inside the block, each back in its own
    dtype after it (exactly: a float32, float16 or bfloat16 value converts to float64 and back unchanged). In place,
    not a copy: a method may hold what cannot be copied (``higher``'s patched modules), and the float64 weights
    take only the memory of a second copy of them while the block runs."""
    def tensors():  # (module, "_parameters" | "_buffers", name, tensor), shared ones once per owner
        for m in module.modules():
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(m, kind).items():
                    if t is not None:
                        yield m, kind, name, t

    dtypes = {(id(m), kind, name): t.dtype for m, kind, name, t in tensors()}
    module.double()
    try:
        yield module
    finally:
        with torch.no_grad():
            for m, kind, name, t in list(tensors()):
                dtype = dtypes.get((id(m), kind, name), t.dtype)
                if kind == "_parameters":
                    t.data = t.data.to(dtype)
                    if t.grad is not None:
                        t.grad = t.grad.to(dtype)
                else:
                    m._buffers[name] = t.to(dtype)


def float64_check(method: FewShotMethod, batch: EpisodeBatch, idx: Sequence[int], seed: int, error_dir: Path,
                  split: str) -> Float64Check:
    """The batched and per-episode paths in float64 on the first :data:`FLOAT64_CHECK_EPISODES` episodes of
    ``batch``, with ``method`` in float64 (:func:`in_float64`; autocast off; its weights are as they were after).

    For when the two paths disagree at the evaluation's precision by more than :func:`logits_gap` allows: a method
    whose result is sensitive to rounding (MAML's test-time steps on near-tied max-pool windows: a float32 and a
    float64 run of the *per-episode* path differ as much) gives the same logits on both paths in float64; a batched
    path that computes something else does not.

    Args:
        method: the method (eval mode).
        batch: the batch the disagreement was found on (its episodes in ``idx`` order).
        idx: the episodes' indices (their seeds: :func:`episode_seed`).
        seed, error_dir, split: as for :func:`_seeded_episode`.

    Returns:
        A :class:`Float64Check`; one that could not run (no float64 on the device, a method that cannot be
        copied or run in float64) does not agree.
    """
    n = min(FLOAT64_CHECK_EPISODES, len(idx))
    try:
        with in_float64(method) as exact:
            sub = EpisodeBatch(batch.support_x[:n].double(), batch.support_y[:n], batch.query_x[:n].double(),
                               batch.query_y[:n], batch.ways)
            got = run_episodes(exact, sub, idx[:n], [episode_seed(seed, i) for i in idx[:n]], split=split)
            ref = torch.stack([_seeded_episode(exact, EpisodeTensors(sub.support_x[e], sub.support_y[e], sub.query_x[e],
                                                                     sub.query_y[e]),
                                               idx[e], sub.ways, seed, "fp32", error_dir, split) for e in range(n)])
    except (KeyboardInterrupt, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 (whatever stops the check, the batched path is not trusted)
        return Float64Check(False, float("inf"), None, " ".join(str(exc).split())[:200] or type(exc).__name__)
    gap = max(logits_gap(got[e], ref[e])[0] for e in range(n))
    finite = ref[torch.isfinite(ref)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    return Float64Check(gap <= FLOAT64_GAP_TOLERANCE * scale, gap, ref[0])


def _evaluate_batched(method: FewShotMethod, mat: Materialiser, episodes: EpisodeList, missing: List[int],
                      per_call: int, seed: int, precision: str, error_dir: Path, rows: _PendingRows,
                      done: Dict[int, Dict[str, str]], bar, info: Dict[str, object], log: Callable[[str], None]) -> None:
    """The batched path of :func:`evaluate`: ``per_call`` episodes per :meth:`FewShotMethod.evaluate_episodes`;
    rows written after every batch. A batch whose episodes differ in shape runs episode by episode.

    The first batch's first episode is also run through the per-episode path (:func:`logits_gap`): where the two
    disagree by more than rounding, the batched path is dropped with one ``warning:`` line (a batched method that
    has never run on this device cannot write a wrong row without a word). Where the batched path cannot run,
    the evaluation goes on without it, with one ``warning:`` line (the numbers
    are the same either way): out of device memory, the batch is halved (down to one episode at a time); a method
    error in ``evaluate_episodes`` (its traceback in ``error.txt``), the rest runs episode by episode, where a
    method's own bug is reported as usual. ``info`` records what ran (``batch_episodes``, ``batched_fallback``)."""
    chunks = [missing[k:k + per_call] for k in range(0, len(missing), per_call)]
    prepare, finish = stages(lambda chunk: [mat.stage(episodes.episode(i)) for i in chunk],
                             lambda staged: (staged, load_batch(mat, staged)))
    size, checked = per_call, False
    try:
        embed = method.image_embedding()
    except Exception as exc:  # noqa: BLE001 (an optional hook: its failure costs speed, not numbers)
        log(f"warning: {_method_error(method, exc, 'image_embedding', episodes.split, error_dir)}")
        embed = None
    cache = EmbeddingCache(embed, len(mat.store.images), mat.device) if embed is not None else None
    with Prefetcher(chunks, prepare, finish) as batches:
        t0 = time.perf_counter()
        for chunk, (staged, whole) in zip(chunks, batches):
            pending = list(zip(chunk, staged))
            while pending:
                part, pending = pending[:size], pending[size:]
                idx = [i for i, _ in part]
                batch = (whole if len(part) == len(chunk) else load_batch(mat, [st for _, st in part])) if size > 1 else None
                if batch is None:  # one at a time: the per-episode path (or episodes of different shapes)
                    for i, st in part:
                        t = mat.load(st)
                        logits = _seeded_episode(method, t, i, st.ways, seed, precision, error_dir, episodes.split)
                        rows.add(i, logits, t.query_y, time.perf_counter() - t0)
                        t0 = time.perf_counter()
                    bar.update(len(part))
                    continue
                note = None
                try:
                    with autocast(precision, mat.device):
                        logits = run_episodes(method, batch, idx, [episode_seed(seed, i) for i in idx],
                                              error_dir=error_dir, split=episodes.split, cache=cache)
                except torch.OutOfMemoryError:
                    del batch
                    if mat.device.type == "cuda":
                        torch.cuda.empty_cache()
                    size = max(1, size // 2)
                    log(f"warning: out of memory evaluating {len(idx)} episodes at once; now {size} at a time "
                        f"(set eval.batch_episodes to choose)")
                    info["batch_episodes"] = size
                    pending = part + pending
                    continue
                except MethodError as exc:
                    note = f"batched evaluation failed on {episodes.split} episodes {idx[0]}-{idx[-1]} ({exc})"
                    advice = "evaluating episode by episode from there (same numbers)"
                if note is None and not checked:  # the batched path's first episode against the per-episode path, once
                    checked = True
                    i, st = part[0]
                    single = _seeded_episode(method, mat.load(st), i, st.ways, seed, precision, error_dir,
                                             episodes.split)
                    gap, tolerance = logits_gap(logits[0], single)
                    info["batched_check"] = f"{episodes.split} episode {i}: max |logit difference| {gap:.3g}"
                    if not gap <= tolerance:  # rounding the method amplifies, or a bug: settle it in float64
                        exact = float64_check(method, batch, idx, seed, error_dir, episodes.split)
                        info["batched_check"] += f" > {tolerance:.3g}; {exact.detail(single)}"
                        if not exact.agrees:
                            note = (f"batched evaluation disagrees with the per-episode path on {episodes.split} "
                                    f"episode {i} (max |logit difference| {gap:.3g} > {tolerance:.3g}; "
                                    f"{exact.detail(None)})")
                            advice = "evaluating episode by episode (the per-episode path is the reference)"
                if note is not None:  # the rest one episode at a time
                    log(f"warning: {note}; {advice}")
                    size, info["batch_episodes"], info["batched_fallback"] = 1, 1, note
                    pending = part + pending
                    continue
                seconds = (time.perf_counter() - t0) / len(idx)
                for e, i in enumerate(idx):
                    rows.add(i, logits[e], batch.query_y[e], seconds)
                t0 = time.perf_counter()
                bar.update(len(part))
                if cache is not None and cache.embedded:
                    info["embedded_images"] = f"{cache.embedded} images embedded for {cache.served} image draws"
            rows.write(done)
