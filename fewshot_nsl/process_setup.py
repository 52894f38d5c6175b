"""How a process is set up before it builds and trains a network, shared by every entry point that trains one:
:func:`fewshot_nsl.runner.train` (local runs, Ray train and evaluation tasks), the Ray pretraining task
(:mod:`fewshot_nsl.executors`) and each ``torchrun`` pretraining process (:mod:`fewshot_nsl.distributed`).

One function, so a pretraining cached by any of them is trained the same way (the pretraining cache key does
not record these switches; see :func:`fewshot_nsl.training_state.pretrain_key`):

* ``cuda:N``: GPU N becomes the current device (:func:`torch.cuda.set_device`), so CUDA's context and any
  allocation on "the current device" go to GPU N, not GPU 0;
* seeds and torch's determinism switches (:func:`~fewshot_nsl.training_state.set_seed`);
* the CUDA fast mode (cuDNN autotuner, TF32, channels-last) on, or off with ``--deterministic``
  (:func:`~fewshot_nsl.precision.configure_backends`): set every time, so a reused process (a Ray worker) never
  keeps the switches of its previous task;
* the network built on the device, in channels-last when the fast mode is on, and whether it is compiled
  (:func:`fewshot_nsl.compiling.resolve`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch

from . import inputs
from .compiling import resolve as resolve_compile
from .config import RunConfig
from .errors import ConfigError
from .precision import configure_backends
from .training_state import set_seed


@dataclass
class Built:
    """A network built for a run by :func:`build_for_device`.

    Attributes:
        method: the method, on the device (channels-last where ``fast["channels_last"]``).
        fast: the fast-mode switches in force (:func:`~fewshot_nsl.precision.configure_backends`).
        compiled: whether the run compiles its networks (pass it on to the training loops).
    """

    method: torch.nn.Module
    fast: Dict[str, bool]
    compiled: bool


def setup_process(cfg: RunConfig, device: torch.device) -> Dict[str, bool]:
    """Select the GPU, seed, and set the determinism and fast-mode switches for ``cfg`` on ``device``.

    Called right before the network is built, so the initial weights do not depend on what ran before in the
    process (a dataset generated or loaded, an earlier task of a Ray worker).

    Returns:
        The fast-mode switches: ``{"cudnn_benchmark", "tf32", "channels_last"}``; all False on a CPU and with
        ``--deterministic``.

    Raises:
        ConfigError: ``cuda:N`` with N not below the number of GPUs torch sees.
    """
    if device.type == "cuda" and device.index is not None:
        visible = torch.cuda.device_count()
        if device.index >= visible:
            raise ConfigError(f"--device {device} was asked for but torch sees {visible} GPU(s) (cuda:0 to "
                              f"cuda:{max(visible - 1, 0)}; CUDA_VISIBLE_DEVICES renumbers them); pick one of those")
        torch.cuda.set_device(device.index)
    set_seed(cfg.seed, cfg.deterministic)
    return configure_backends(device, cfg.deterministic)


def build_for_device(cfg: RunConfig, device: torch.device, log: Callable[[str], None] = print) -> Built:
    """:func:`setup_process`, then the run's method built on ``device`` (channels-last in the fast mode) and the
    run's ``compile`` setting resolved; the reason is logged (as a warning where the run stays eager although
    compilation was asked for, or ``auto`` on CUDA).
    """
    fast = setup_process(cfg, device)
    method = inputs.build_method(cfg).to(device)
    if fast["channels_last"]:
        method.to(memory_format=torch.channels_last)
    compiled, why = resolve_compile(cfg.compile, device, method)
    if compiled:
        log(why)
    elif cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda"):  # why it stays eager
        log(f"warning: {why}")
    return Built(method, fast, compiled)
