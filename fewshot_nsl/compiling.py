"""The ``compile: auto|on|off`` setting: :func:`torch.compile` (inductor) of the networks a run trains and evaluates.

* ``off``: eager PyTorch everywhere.
* ``on``: the pretraining network (backbone + base-class head) and the method's backbone (episodic
  training, evaluation) are compiled in place with :meth:`torch.nn.Module.compile` (inductor: C++/OpenMP
  kernels on CPU, Triton on GPU); parameter names and checkpoints are unchanged. Where the backend is
  missing (no C++ compiler on CPU, no Triton on GPU) the run stays eager with one warning; where a graph
  cannot be compiled, dynamo falls back to eager for that graph (``suppress_errors``) with its own warning.
* ``auto`` (default): ``on`` on CUDA when Triton is present, ``off`` on CPU. On the 2-core CPU of
  ``benchmarks/RESULTS.md`` compilation did not pay: a dynamic DNS CNN-4 training step compiled ran at
  0.99x-1.16x the eager step after 72-135 s of compilation, which a quick-profile cell does not win back.

Methods whose inner loop runs through ``higher`` (MAML, meta-learned static NSN, Meta-SGD:
``compilable = False`` on the class) stay eager: ``higher`` rebuilds the functional network at every
inner step, which dynamo cannot trace into a reusable graph. ``compile: on`` says so in one warning line.

The setting changes rounding only, not what a row is: it is recorded in ``summary.json``
(``compiled``) and, like the device, left out of the config hash.
"""
from __future__ import annotations

import os
import shutil
from typing import Optional, Tuple

import torch
from torch import nn

from .errors import ConfigError

#: accepted values of ``compile:`` / ``--compile`` (YAML's ``on``/``off`` booleans are mapped to them)
COMPILE_SETTINGS = ("auto", "on", "off")


def normalise_setting(value: object) -> str:
    """``"auto"``/``"on"``/``"off"`` (``True``/``False``, as YAML reads a bare on/off, map to on/off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value not in COMPILE_SETTINGS:
        raise ConfigError(f"compile must be one of {', '.join(COMPILE_SETTINGS)}, got {value!r}")
    return str(value)


def backend_problem(device: torch.device) -> Optional[str]:
    """Why inductor cannot compile for ``device`` here (a sentence), or ``None`` when it can."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed (pip install triton)"
        return None
    if device.type != "cpu":
        return f"no inductor backend for device type {device.type}"
    compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        return "no C++ compiler on PATH (inductor's CPU backend needs g++ or clang++)"
    return None


def resolve(setting: str, device: torch.device, method: nn.Module) -> Tuple[bool, str]:
    """Whether this run compiles, and why (for the log).

    Args:
        setting: ``"auto"``, ``"on"`` or ``"off"``.
        device: the run's device.
        method: the built method (its class attribute ``compilable``, default ``True``).

    Returns:
        ``(compile, reason)``; the caller shows the reason as a warning when ``setting`` is ``"on"``
        and the run stays eager.
    """
    setting = normalise_setting(setting)
    if setting == "off":
        return False, "compile: off"
    name = type(method).__name__
    if not getattr(method, "compilable", True):
        return False, (f"compile: {setting} is not used for {name}: its inner loop runs through higher, which "
                       f"torch.compile cannot trace into a reusable graph; running eager")
    if setting == "auto" and device.type != "cuda":
        return False, "compile: auto is eager on CPU (compilation did not pay there: benchmarks/RESULTS.md)"
    problem = backend_problem(device)
    if problem:
        return False, f"compile: {setting}, but {problem}; running eager"
    return True, f"compiled with torch.compile (inductor, {setting})"


def compile_in_place(module: nn.Module) -> nn.Module:
    """Compile ``module``'s forward in place (:meth:`torch.nn.Module.compile`); names and state dict unchanged.

    A graph that fails to compile runs eager (``torch._dynamo.config.suppress_errors``), so a backend
    problem found late costs speed, never the run.
    """
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    module.compile()
    return module


def is_compiled(module: nn.Module) -> bool:
    """Whether :func:`compile_in_place` was applied to ``module``."""
    return getattr(module, "_compiled_call_impl", None) is not None
