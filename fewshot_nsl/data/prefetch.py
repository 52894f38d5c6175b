"""An input pipeline that overlaps: the next batch or episode is prepared while the current one computes.

:class:`Prefetcher` walks a ``source`` of work items (batch indices, episodes) in the caller's
thread and runs ``prepare`` on the next ``depth`` items in one background thread while the caller
computes on the current one; ``finish`` (where given) then runs in the caller's thread on each
prepared item, in order. Results are exactly those of the plain loop
``for item in source: yield finish(prepare(item))``:

* the source is iterated in the caller's thread only, in order, so any random numbers it draws
  (training episodes, augmentation parameters) come from its generators in the same sequence;
  ``prepare`` must draw none;
* one worker thread, first in first out: items come back in source order;
* an exception raised by the source or by ``prepare`` for an item is raised when that item is
  reached, not before.

``prepare`` gathers the uint8 images from the store (pinned host buffers for CUDA); ``finish`` converts,
normalises and augments them on the device in the caller's thread: on CUDA so that every kernel is queued on
the caller's stream, on a CPU so that torch's parallel kernels never run from two threads at once (two thread
teams on the same cores preempt each other; :func:`stages` gives the figures).

``FEWSHOT_NSL_PREFETCH=0`` in the environment turns prefetching off everywhere (items prepared in
the caller's thread when they are needed, as before the pipeline overlapped): the switch the
benchmarks use to measure both ways in one process. Results are identical either way.
"""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Deque, Generic, Iterable, Iterator, List, Optional, Tuple, TypeVar

S = TypeVar("S")  # a source item (what to prepare)
P = TypeVar("P")  # a prepared item (worker thread)
T = TypeVar("T")  # a finished item (caller's thread)

#: Environment variable that turns prefetching off (``0``, ``off``, ``false``, ``no``).
ENV_SWITCH = "FEWSHOT_NSL_PREFETCH"


def prefetch_enabled() -> bool:
    """Whether prefetching is on (the default); ``FEWSHOT_NSL_PREFETCH=0`` turns it off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def stages(
    host: Callable[[S], P], to_device: Callable[[P], T]
) -> Tuple[Callable[[S], object], Callable[[object], T]]:
    """Split ``to_device(host(item))`` into a worker part and a caller part for :class:`Prefetcher`, on every device.

    Args:
        host: host-side preparation (reads, pinned buffers); runs in the worker thread.
        to_device: copy to the device and device-side arithmetic.

    Returns:
        ``(prepare, finish)``: ``host`` in the worker and ``to_device`` in the caller's thread, so device kernels and
        non-blocking copies are queued on the caller's current stream. On a CPU as well: torch's parallel kernels
        called from the worker thread start a second thread team beside the caller's, and with ``--threads`` equal
        to the cores the two teams preempt each other (2 threads on a 2-core CPU: the per-episode evaluation of
        static NSN 170 -> 97 ms, of finetune 280 -> 85 ms per episode with the conversion in the caller; at
        1 thread no difference). The worker keeps the reads from the store, numpy work that starts no team.
    """
    return host, to_device  # type: ignore[return-value]


def _identity(x):
    return x


class Prefetcher(Generic[S, T], Iterator[T]):
    """Iterate ``finish(prepare(item))`` over ``source``, preparing ``depth`` items ahead in a background thread.

    Use it as a context manager (or call :meth:`close`) so the worker thread ends with the loop, also when the
    loop is left early (an early stop, an exception, Ctrl-C).

    Args:
        source: the work items, iterated in the caller's thread (it may draw random numbers).
        prepare: item -> prepared item; runs in the worker thread; must draw no random numbers.
        finish: prepared item -> result, in the caller's thread (default: the identity).
        depth: items prepared ahead of the one the caller works on.
        enabled: None (default): :func:`prefetch_enabled`; False: everything in the caller's thread, on demand.

    Attributes:
        wait_seconds: wall seconds the caller spent inside ``next()`` (pulling the source, waiting for the
            worker, ``finish``): the loop's data time.
    """

    def __init__(
        self,
        source: Iterable[S],
        prepare: Callable[[S], P],
        finish: Optional[Callable[[P], T]] = None,
        depth: int = 1,
        enabled: Optional[bool] = None,
    ) -> None:
        self._source = iter(source)
        self._prepare = prepare
        self._finish = finish or _identity
        self._depth = max(0, depth) if (prefetch_enabled() if enabled is None else enabled) else 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fewshot-prefetch") if self._depth else None
        self._pending: Deque[Tuple[S, Future]] = deque()
        self._exhausted = False
        self.wait_seconds = 0.0

    @property
    def enabled(self) -> bool:
        """Whether items are prepared ahead in a worker thread."""
        return self._pool is not None

    def pending(self) -> List[S]:
        """Source items pulled ahead (prepared or being prepared) but not yet returned, in order."""
        return [item for item, _ in self._pending]

    def _pull(self) -> bool:
        """Pull one source item and start preparing it; False once the source is exhausted."""
        if self._exhausted:
            return False
        fut: Future = Future()
        try:
            item = next(self._source)
        except StopIteration:
            self._exhausted = True
            return False
        except Exception as exc:  # raised when its turn comes, after the items before it
            self._exhausted = True
            fut.set_exception(exc)
            self._pending.append((None, fut))  # type: ignore[arg-type]
            return True
        if self._pool is None:
            try:
                fut.set_result(self._prepare(item))
            except Exception as exc:
                fut.set_exception(exc)
        else:
            fut = self._pool.submit(self._prepare, item)
        self._pending.append((item, fut))
        return True

    def __iter__(self) -> "Prefetcher[S, T]":
        return self

    def __next__(self) -> T:
        t0 = time.perf_counter()
        try:
            if not self._pending and not self._pull():
                raise StopIteration
            _, fut = self._pending.popleft()
            prepared = fut.result()
            while len(self._pending) < self._depth and self._pull():  # the next ones start while the caller computes
                pass
            return self._finish(prepared)
        finally:
            self.wait_seconds += time.perf_counter() - t0

    def close(self) -> None:
        """Stop the worker: items not started are dropped, the one being prepared is waited for."""
        for _, fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._exhausted = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "Prefetcher[S, T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
