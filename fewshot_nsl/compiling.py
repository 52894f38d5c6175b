"""The ``compile: auto|on|off`` setting: :func:`torch.compile` (inductor) of the networks a run trains and evaluates.

* ``off``: eager PyTorch everywhere.
* ``on``: the pretraining network (backbone + base-class head) and the method's backbone (episodic
  training, evaluation) are compiled in place (:func:`compile_in_place`; inductor: C++/OpenMP kernels on
  CPU, Triton on GPU); parameter names and checkpoints are unchanged. Where the backend is missing (no
  C++ compiler on CPU, no Triton on GPU) the run stays eager with one warning. Where a graph fails to
  compile later (dynamo or the backend raising, forward or backward), the module falls back to eager
  with one warning line naming the module and the error; nothing falls back silently (dynamo's
  ``suppress_errors`` is left off).
* ``auto`` (default): ``off`` on CPU; on CUDA (with Triton) ``on`` only for networks made of the
  modules in :data:`GRAPH_BREAK_CHECKED`, whose forward the tests trace with ``torch._dynamo.explain``
  to zero graph breaks (``tests/test_nn_autocast_compile.py``: CNN-4 and CNN-9 with plain, static and
  every dynamic NSConv2d layer); another network stays eager and the reason names its unchecked
  modules (``compile: on`` compiles it anyway). On the 2-core CPU of ``benchmarks/RESULTS.md``
  compilation did not pay: a dynamic DNS CNN-4 training step compiled ran at 0.99x-1.16x the eager step
  after 72-135 s of compilation, which a quick-profile cell does not win back.

Methods whose inner loop runs through ``higher`` (MAML, meta-learned static NSN, Meta-SGD:
``compilable = False`` on the class) stay eager: ``higher`` rebuilds the functional network at every
inner step, which dynamo cannot trace into a reusable graph. ``compile: on`` says so in one warning line.

The setting changes rounding only, not what a row is: it is recorded in ``summary.json``
(``compiled``) and, like the device, left out of the config hash.
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import nn

from .errors import ConfigError

#: accepted values of ``compile:`` / ``--compile`` (YAML's ``on``/``off`` booleans are mapped to them)
COMPILE_SETTINGS = ("auto", "on", "off")
#: Module classes (``module.qualname``) whose forward the tests trace to zero graph breaks
#: (``tests/test_nn_autocast_compile.py`` explains networks made of exactly these); ``compile: auto``
#: compiles on CUDA only networks made of them. A class is matched exactly, not its subclasses (a
#: subclass may override ``forward``).
GRAPH_BREAK_CHECKED = (
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.linear.Linear",
    "fewshot_nsl.backbones.CNN4",
    "fewshot_nsl.backbones.CNN9",
    "fewshot_nsl.nn.nsconv.NSConv2d",
    "fewshot_nsl.nn.sphere.SimilarityPredictor",
    "fewshot_nsl.nn.sphere.PredictorCore",
    "fewshot_nsl.nn.sphere.SphereConv2d",
    "fewshot_nsl.nn.sphere.HeNormalConv2d",
)


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


def _qualname(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def unchecked_modules(module: nn.Module) -> List[str]:
    """Class names of ``module`` and its sub-modules that are not in :data:`GRAPH_BREAK_CHECKED`, sorted.

    Args:
        module: a network that would be compiled.

    Returns:
        Short class names (``GRU``, ``MyBlock``); empty when every module is checked.
    """
    return sorted({type(m).__name__ for m in module.modules() if _qualname(m) not in GRAPH_BREAK_CHECKED})


def _compiled_networks(method: nn.Module) -> List[nn.Module]:
    """The modules a run compiles: the method's backbone and its pretraining module (when it has them)."""
    nets = [getattr(method, "backbone", None)]
    pretrain_module = getattr(method, "pretrain_module", None)
    if callable(pretrain_module):
        nets.append(pretrain_module())
    return [n for n in nets if isinstance(n, nn.Module)]


def resolve(setting: str, device: torch.device, method: nn.Module) -> Tuple[bool, str]:
    """Whether this run compiles, and why (for the log).

    Args:
        setting: ``"auto"``, ``"on"`` or ``"off"``.
        device: the run's device.
        method: the built method (its class attribute ``compilable``, default ``True``; its
            ``backbone`` and ``pretrain_module()``, which ``auto`` checks against
            :data:`GRAPH_BREAK_CHECKED`).

    Returns:
        ``(compile, reason)``, the reason one line; the caller shows it as a warning when the run stays
        eager although ``setting`` is ``"on"``, or ``"auto"`` on CUDA.
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
    if setting == "auto":
        unchecked = sorted({c for net in _compiled_networks(method) for c in unchecked_modules(net)})
        if unchecked:
            return False, (f"compile: auto stays eager for {name}: its network uses {', '.join(unchecked)}, not "
                           f"checked for graph breaks (fewshot_nsl.compiling.GRAPH_BREAK_CHECKED); "
                           f"compile: on compiles it anyway")
    problem = backend_problem(device)
    if problem:
        return False, f"compile: {setting}, but {problem}; running eager"
    return True, f"compiled with torch.compile (inductor, {setting})"


def _first_line(err: BaseException, limit: int = 300) -> str:
    """``"<Error>: <first line>"`` of a compile failure, naming the backend's own error when dynamo wraps one."""
    inner = getattr(err, "inner_exception", None)
    err = inner if isinstance(inner, BaseException) else err
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _warn_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def compile_in_place(
    module: nn.Module, warn: Optional[Callable[[str], None]] = None, backend: Any = "inductor"
) -> nn.Module:
    """Compile ``module``'s forward in place (:meth:`torch.nn.Module.compile`); names and state dict unchanged.

    A compile failure is never silent and never ends the run: when dynamo or the backend raises while
    compiling a graph of ``module`` (the backward is compiled with its forward, so its failures show
    here too), one line ``warning: torch.compile failed for <class> (<error>); running it eager``
    goes to ``warn`` and ``module`` runs eager from then on. (A module whose forward dynamo splits
    into several graphs may have run the graphs before the failing one once more.)

    Args:
        module: the network; compiled in place.
        warn: where the warning line goes (default: standard error).
        backend: the ``torch.compile`` backend (tests use a failing one).

    Returns:
        ``module``.
    """
    from torch._dynamo.exc import TorchDynamoException
    from torch._functorch import config as functorch_config

    warn = warn or _warn_stderr
    module.compile(backend=backend)
    compiled = module._compiled_call_impl
    failed: List[str] = []

    def call(*args: Any, **kwargs: Any) -> Any:
        if not failed:
            try:
                # compile the backward now, inside this try, rather than at the first backward call
                with functorch_config.patch(force_non_lazy_backward_lowering=True):
                    return compiled(*args, **kwargs)
            except TorchDynamoException as err:
                failed.append(_first_line(err))
                warn(f"warning: torch.compile failed for {type(module).__name__} ({failed[0]}); running it eager")
        return module._call_impl(*args, **kwargs)

    module._compiled_call_impl = call
    return module


def is_compiled(module: nn.Module) -> bool:
    """Whether :func:`compile_in_place` was applied to ``module``."""
    return getattr(module, "_compiled_call_impl", None) is not None
