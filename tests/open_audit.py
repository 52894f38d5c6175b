"""One process-wide audit hook (``sys.addaudithook``) that records the files Python opens.

Audit hooks cannot be removed, so the hook is installed once, at import, and only records while
:func:`recording_opens` is active (in every thread: the loaders decode images in a thread pool).
It sees ``open`` events (``open()``, ``io.open``, ``os.open``, PIL and numpy reads), not files a C
library opens by itself (HDF5): tests that need those wrap ``h5py.File`` as well.
"""
from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Set, Union

_lock = threading.Lock()
_recording: Optional[List[object]] = None


def _hook(event: str, args: tuple) -> None:
    """Record the path of every ``open`` event while recording (kept minimal: no I/O in a hook)."""
    if event == "open" and _recording is not None and args and not isinstance(args[0], int):
        _recording.append(args[0])


sys.addaudithook(_hook)  # once, at import (a module is imported once per process)


@contextmanager
def recording_opens() -> Iterator[List[object]]:
    """Record the paths opened inside the ``with`` block (raw, as passed to ``open``)."""
    global _recording
    with _lock:
        if _recording is not None:
            raise RuntimeError("recording_opens is not re-entrant")
        events: List[object] = []
        _recording = events
    try:
        yield events
    finally:
        with _lock:
            _recording = None


def real(path: Union[str, os.PathLike, bytes]) -> str:
    """The resolved absolute path (links followed), for comparing listings with open events."""
    return os.path.realpath(os.fsdecode(path))


def opened_under(root: Path, events: Iterable[object]) -> Set[str]:
    """The resolved paths of ``events`` that lie inside ``root``."""
    base = real(root) + os.sep
    out = set()
    for e in events:
        try:
            p = real(e)  # type: ignore[arg-type]
        except TypeError:
            continue
        if p.startswith(base):
            out.add(p)
    return out
