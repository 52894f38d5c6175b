"""Numeric precision of a run (``precision: fp32 | bf16 | fp16``, ``--precision``) and the speed switches of a
CUDA run (cuDNN autotuner, TF32, channels-last) that ``--deterministic`` turns off.

Mixed precision is ``torch.autocast`` over the forward passes and losses of training (pretraining and
episodic), of validation and of evaluation (a method's ``fit_support`` and ``forward``), with the weights and the
optimiser state kept in fp32; ``fp16`` adds a :class:`torch.amp.GradScaler` (loss scaling) to the training
loops. The precision changes numbers, so it is part of the config hash and of a leaderboard row's key
(:data:`fewshot_nsl.leaderboard.KEY`); ``fp32`` is the default and runs without autocast. On a CPU ``bf16`` runs
every method (the tests exercise it there); ``fp16`` autocast on a CPU is what torch provides and is not a
target of this suite.

The fast mode (:func:`configure_backends`) is for CUDA only: ``cudnn.benchmark`` picks the fastest convolution
algorithms for the shapes it sees, TF32 runs fp32 matmuls and convolutions on tensor cores (10-bit mantissa
inputs), and channels-last lays the networks' activations out as NHWC. All three change rounding, not the
experiment: they are recorded in the run's summary and row (``fast_mode``) but are not part of the identity,
like ``compile``.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Dict

import torch

#: ``precision`` choices and their autocast dtypes (``None``: no autocast).
PRECISIONS: Dict[str, Any] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> ContextManager[Any]:
    """The autocast context of ``precision`` on ``device`` (a no-op for ``fp32``)."""
    dtype = PRECISIONS[precision]
    if dtype is None or device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for ``fp16`` on CUDA (a disabled scaler, which passes everything through, otherwise)."""
    return torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu",
                                enabled=precision == "fp16" and device.type == "cuda")


def configure_backends(device: torch.device, deterministic: bool) -> Dict[str, bool]:
    """Switch the CUDA fast mode on (``deterministic=False``) or off, and return what is on.

    Returns:
        ``{"cudnn_benchmark": bool, "tf32": bool, "channels_last": bool}``; all False on a CPU and with
        ``--deterministic``.
    """
    fast = device.type == "cuda" and not deterministic
    torch.backends.cudnn.benchmark = fast
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = fast if device.type == "cuda" else torch.backends.cudnn.allow_tf32
    return {"cudnn_benchmark": fast, "tf32": fast, "channels_last": fast}


def fast_mode_text(switches: Dict[str, bool]) -> str:
    """``"cudnn.benchmark+tf32+channels_last"``, or ``"off"`` (the ``fast_mode`` column of a row)."""
    names = {"cudnn_benchmark": "cudnn.benchmark", "tf32": "tf32", "channels_last": "channels_last"}
    on = [names[k] for k, v in switches.items() if v]
    return "+".join(on) if on else "off"
