"""Host memory of a run: glibc's ``malloc`` keeps the memory of freed tensors for the next ones.

A CPU training step allocates and frees the same large tensors (activations, their gradients) every
step. With glibc's defaults those blocks go back to the kernel when freed (``munmap``, or a trim of
the heap's top), and the next step takes every page again through a page fault that also zeroes
it. On the 2-core AMD EPYC of ``benchmarks/RESULTS.md`` a CNN-4 training step at 42 px, batch 64,
1 thread, took about 6,900 minor page faults and 10 ms of kernel time (the plain step: 41 ms, 25 ms
with the setting below; the dynamic DNS step: 11,200 faults, 113 ms against 94 ms).

:func:`retain_freed_memory` sets, once per process, glibc's ``M_MMAP_THRESHOLD`` to 32 MiB (the
largest it accepts: blocks below it come from the heap; larger ones are still mapped and unmapped)
and ``M_TRIM_THRESHOLD`` to 1 GiB (the heap keeps up to that much free memory at its top). This is
what a caching allocator does (PyTorch's on CUDA; jemalloc or tcmalloc preloaded, as CPU tuning
guides advise), from inside the process. It changes no number a run computes, only where its
memory comes from: the process keeps its peak heap instead of handing it back between steps.

``FEWSHOT_NSL_MALLOC=default`` in the environment leaves ``malloc`` as it is. Elsewhere than glibc
(macOS, musl) nothing is changed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from typing import Optional

__all__ = ["retain_freed_memory", "ENV_SWITCH"]

#: Environment variable; ``default`` leaves glibc's ``malloc`` settings alone.
ENV_SWITCH = "FEWSHOT_NSL_MALLOC"
#: glibc's ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap (glibc's ceiling for ``M_MMAP_THRESHOLD`` on 64-bit systems).
MMAP_THRESHOLD = 32 << 20
#: Free memory the heap keeps at its top before giving it back.
TRIM_THRESHOLD = 1 << 30

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
    """Make glibc keep freed tensor memory for reuse (module doc); once per process, later calls return the first answer.

    Returns:
        ``"retained"``, or why not: ``"default (FEWSHOT_NSL_MALLOC=default)"``, ``"default (not glibc)"``,
        ``"default (mallopt refused)"``.
    """
    global _state
    with _lock:
        if _state is None:
            _state = _apply()
        return _state


def _apply() -> str:
    if os.environ.get(ENV_SWITCH, "").strip().lower() == "default":
        return f"default ({ENV_SWITCH}=default)"
    libc = _glibc()
    if libc is None:
        return "default (not glibc)"
    if libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return "default (mallopt refused)"
    return "retained"
