"""Provenance of a run: the suite's git state, the device, peak memory, and paths as recorded."""
from __future__ import annotations

import json
import platform
import resource
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .data.episodes import (
    EPISODES_DIR,
)


# ----------------------------------------------------------------------------- provenance helpers
def git_info() -> Dict[str, Any]:
    """``{"version": package version, "git_commit": sha, "git_dirty": bool}``; the commit only when
    the suite runs from a git checkout (None for an installed copy, see :mod:`fewshot_nsl.resources`)."""
    from .resources import git_info as _git
    from .resources import version

    return {"version": version(), **_git()}


def device_name(device: torch.device) -> str:
    """GPU model, or the CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA peak stats on GPU, the RSS high-water mark on Linux.

    Before CUDA is initialised in this process the CUDA peak is zero and there is nothing to reset (and
    ``torch.cuda.reset_peak_memory_stats`` would raise "Invalid device argument" for ``cuda:N``).
    """
    if device.type == "cuda":
        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux >= 4.0: writing 5 resets VmHWM (the peak resident set size) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated (GPU), else the process's peak resident set size since the last
    :func:`reset_peak_memory` (``VmHWM``; ``ru_maxrss``, the lifetime peak, where unavailable). 0 on a CUDA device
    before CUDA is initialised in this process (nothing was allocated)."""
    if device.type == "cuda":
        if not torch.cuda.is_initialized():
            return 0.0
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0




def _display_path(path: Path, results_dir: Path) -> str:
    """``path`` relative to the folder holding the committed ``episodes/`` (the checkout or the
    installed package: ``episodes/<dataset>/...`` either way) or to the results folder (generated
    lists: ``episodes/...``), else absolute."""
    if not path.is_absolute():
        return str(path)
    for base in (EPISODES_DIR.parent, results_dir.resolve()):
        try:
            return str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            continue
    return str(path)


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
