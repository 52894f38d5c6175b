"""Host memory of a run: glibc's ``malloc`` keeps the memory of freed tensors for the next ones.

A CPU training step allocates and frees the same large tensors (activations, their gradients) every
step. With glibc's defaults the large blocks are mapped when allocated and unmapped when freed, and
the heap's top is trimmed, so the next step takes every page again through a page fault that also
zeroes it. On the 2-core AMD EPYC of ``benchmarks/RESULTS.md``, a plain CNN-4 training step at 84 px,
batch 64, 1 thread, took 87,000 minor page faults and 134 ms of kernel time out of 258 ms; with the
setting below, 119 ms (2 threads: 145 -> 63 ms; the dynamic DNS step 526 -> 381 ms).

:func:`retain_freed_memory` sets, once per process, glibc's ``M_MMAP_MAX`` to 0 (every block comes
from the heap, none from a mapping of its own) and ``M_TRIM_THRESHOLD`` to -1 (the heap is never
trimmed). Freed blocks are then reused by the next step's allocations. This is what a caching
allocator does (PyTorch's on CUDA; jemalloc or tcmalloc preloaded, as CPU tuning guides advise),
from inside the process. It changes no number a run computes, only where its memory comes from:
the process keeps its peak heap until it ends (the peak RSS rose 10-16% in the steps above, from
heap fragmentation).

``FEWSHOT_NSL_MALLOC=default`` in the environment leaves ``malloc`` as it is (``retain``, or unset, is
the default). Elsewhere than glibc (macOS, musl) nothing is changed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from typing import Optional

from .errors import ConfigError

__all__ = ["retain_freed_memory", "check_switch", "ENV_SWITCH"]

#: Environment variable; ``default`` leaves glibc's ``malloc`` settings alone.
ENV_SWITCH = "FEWSHOT_NSL_MALLOC"
#: glibc's ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
#: ``M_MMAP_MAX``: no block gets a mapping of its own (``M_MMAP_THRESHOLD`` cannot exceed 32 MiB, and an 84 px
#: batch's activations are larger).
MMAP_MAX = 0
#: ``M_TRIM_THRESHOLD``: -1 never trims the heap's top.
TRIM_THRESHOLD = -1

_lock = threading.Lock()
_state: Optional[str] = None


def _glibc() -> Optional[ctypes.CDLL]:
    """The C library if it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError off glibc
        return libc
    except (OSError, AttributeError):
        return None


def retain_freed_memory() -> str:
    """Make glibc keep freed tensor memory for reuse (module doc), once per process; later calls return the first
    answer.

    Returns:
        ``"retained"``, or why not: ``"default (FEWSHOT_NSL_MALLOC=default)"``, ``"default (not glibc)"``,
        ``"default (mallopt refused)"``.

    Raises:
        ConfigError: ``FEWSHOT_NSL_MALLOC`` is set to something other than ``default`` or ``retain`` (nothing is
            changed, and a later call checks again).
    """
    global _state
    with _lock:
        if _state is None:
            _state = _apply()
        return _state


def check_switch() -> bool:
    """Whether ``FEWSHOT_NSL_MALLOC`` asks to keep freed memory (unset or ``retain``: True; ``default``: False).

    Raises:
        ConfigError: any other value, in one line that says what to set.
    """
    switch = os.environ.get(ENV_SWITCH, "").strip().lower()
    if switch not in ("", "retain", "default"):
        raise ConfigError(f"{ENV_SWITCH} must be 'default' (leave glibc's malloc as it is) or 'retain' (the default: "
                          f"keep freed memory for reuse), got {os.environ[ENV_SWITCH]!r}")
    return switch != "default"


def _apply() -> str:
    if not check_switch():
        return f"default ({ENV_SWITCH}=default)"
    libc = _glibc()
    if libc is None:
        return "default (not glibc)"
    if libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1 or libc.mallopt(_M_MMAP_MAX, MMAP_MAX) != 1:
        return "default (mallopt refused)"
    return "retained"
