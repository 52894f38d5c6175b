"""Autocast behaviour of the package's custom autograd Functions (``torch.autocast``, bf16 / fp16).

Every :class:`torch.autograd.Function` in :mod:`fewshot_nsl` declares what it does inside an autocast
region, with :func:`autocast_forward` on its ``forward`` and :func:`autocast_backward` on its
``backward`` (``tests/test_nn_autocast_compile.py`` checks that none is left out):

* ``autocast_forward(AUTOCAST_DTYPE)``: floating-point inputs are cast to the region's autocast dtype
  (bf16 or fp16) and the Function runs with autocast off, so every op inside (``out=`` GEMMs, in-place
  accumulations) sees one dtype, as the conv it replaces would. Used by the three sides of
  :func:`~fewshot_nsl.nn.ns_conv2d`.
* ``autocast_forward(torch.float32)``: inputs are cast to fp32 and the Function runs in fp32 (norms,
  reciprocal square roots, divisions: :func:`~fewshot_nsl.nn.sphere_conv2d` and
  :func:`~fewshot_nsl.nn.input_normalized_conv2d`).

Outside an autocast region both are no-ops (fp32 and fp64 numbers are unchanged). The backward runs in
the autocast state of its forward (``torch.amp.custom_bwd``).

Callers pass the arguments through :func:`autocast_args` first: it makes the same casts, but as
differentiable ops outside the Function, so the Function saves its real inputs and a double backward
(``create_graph``, e.g. second-order MAML through a dynamic layer) reaches the uncast tensors; the
casts inside ``custom_fwd`` are then no-ops, and remain the guarantee for any other caller. Op-level
code that must run in fp32 without a Function uses :func:`in_float32`.

Why not ``torch.amp.custom_fwd`` directly: it binds one ``device_type`` when the decorator is applied
(``custom_fwd(device_type="cuda")`` looks only at CUDA autocast and is a no-op under CPU autocast, and
the reverse), while these Functions run on whatever device their inputs are on. The decorators here
hold one ``torch.amp.custom_fwd`` / ``custom_bwd`` wrapper per device type (and autocast dtype) and pick,
at each call, the one of the first tensor argument's device type, so a CPU call follows
``torch.autocast("cpu")`` and a CUDA call ``torch.autocast("cuda")``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Tuple, TypeVar, Union

import torch

__all__ = [
    "AUTOCAST_DTYPE",
    "autocast_forward",
    "autocast_backward",
    "autocast_args",
    "in_float32",
    "device_type_of",
    "declared_autocast",
]

#: ``cast_inputs`` value of :func:`autocast_forward` meaning "the autocast dtype of the call's region".
AUTOCAST_DTYPE = "autocast"
#: Device types whose ``custom_fwd`` / ``custom_bwd`` wrappers are built when a Function is defined.
DEVICE_TYPES = ("cpu", "cuda")
#: Dtypes an autocast region runs in (``torch.autocast(dtype=...)``).
_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
T = TypeVar("T")
#: Attribute set on a decorated ``forward`` / ``backward`` (what it declares; read by tests and tools).
_MARK = "__fewshot_autocast__"


def device_type_of(args: Sequence[Any]) -> str:
    """Device type (``"cpu"``, ``"cuda"``, ...) of the first tensor in ``args``; ``"cpu"`` if there is none."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device.type
    return "cpu"


def autocast_forward(cast_inputs: Union[torch.dtype, str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator of a custom Function's ``forward``: ``torch.amp.custom_fwd`` on the inputs' device type.

    The ``custom_fwd`` wrappers for :data:`DEVICE_TYPES` and every autocast dtype are built here, once,
    so that ``torch.compile`` traces a look-up (building one while tracing is a graph break); another
    device type gets its wrapper at its first call; a device without autocast (``meta``) runs the
    forward as it is.

    Args:
        cast_inputs: :data:`AUTOCAST_DTYPE` (run in the region's autocast dtype) or a dtype such as
            ``torch.float32`` (run in that dtype). In both cases the forward runs with autocast off.

    Returns:
        The decorator. The backward of the same Function must be wrapped in :func:`autocast_backward`.
    """
    if cast_inputs != AUTOCAST_DTYPE and not isinstance(cast_inputs, torch.dtype):
        raise TypeError(f"cast_inputs must be a torch.dtype or AUTOCAST_DTYPE, got {cast_inputs!r}")

    def decorate(forward: Callable[..., Any]) -> Callable[..., Any]:
        def build(device_type: str, dtype: torch.dtype) -> Callable[..., Any]:
            return torch.amp.custom_fwd(forward, device_type=device_type, cast_inputs=dtype)

        dtypes = _AUTOCAST_DTYPES if cast_inputs == AUTOCAST_DTYPE else (cast_inputs,)
        variants = {(d, t): build(d, t) for d in DEVICE_TYPES for t in dtypes}  # type: ignore[misc]

        @functools.wraps(forward)
        def wrapper(ctx: Any, *args: Any) -> Any:
            device_type = device_type_of(args)
            ctx.autocast_device_type = device_type  # read by autocast_backward
            if device_type not in DEVICE_TYPES and not torch.amp.is_autocast_available(device_type):
                return forward(ctx, *args)  # e.g. "meta": no autocast to follow
            dtype = torch.get_autocast_dtype(device_type) if cast_inputs == AUTOCAST_DTYPE else cast_inputs
            variant = variants.get((device_type, dtype))
            if variant is None:  # another device type or autocast dtype: built once, outside compiled code
                variant = variants[(device_type, dtype)] = build(device_type, dtype)  # type: ignore[arg-type]
            return variant(ctx, *args)

        setattr(wrapper, _MARK, cast_inputs)
        return wrapper

    return decorate


def autocast_backward(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator of a custom Function's ``backward``: ``torch.amp.custom_bwd`` on its forward's device type,
    so the backward runs in the autocast state its forward ran in (wrappers built as in :func:`autocast_forward`)."""
    variants = {d: torch.amp.custom_bwd(backward, device_type=d) for d in DEVICE_TYPES}

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Any) -> Any:
        device_type = ctx.autocast_device_type
        variant = variants.get(device_type)
        if variant is None:
            if not torch.amp.is_autocast_available(device_type):
                return backward(ctx, *grads)
            variant = variants[device_type] = torch.amp.custom_bwd(backward, device_type=device_type)
        return variant(ctx, *grads)

    setattr(wrapper, _MARK, "backward")
    return wrapper


def declared_autocast(method: Callable[..., Any]) -> Union[torch.dtype, str, None]:
    """What a ``forward`` / ``backward`` declares: its ``cast_inputs`` (:data:`AUTOCAST_DTYPE` or a dtype),
    ``"backward"``, or ``None`` when it declares nothing."""
    return getattr(method, _MARK, None)


def _target_dtype(cast_inputs: Union[torch.dtype, str], device_type: str) -> Optional[torch.dtype]:
    """The dtype ``torch.amp.custom_fwd`` casts to on ``device_type`` now, or ``None`` outside autocast."""
    if device_type not in DEVICE_TYPES and not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type) if cast_inputs == AUTOCAST_DTYPE else cast_inputs  # type: ignore[return-value]


def _cast(value: Any, device_type: str, dtype: torch.dtype) -> Any:
    """``value.to(dtype)`` for a floating-point tensor on ``device_type`` other than fp64 (``custom_fwd``'s rule)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64 \
            and value.device.type == device_type:
        return value.to(dtype)
    return value


def autocast_args(cast_inputs: Union[torch.dtype, str], *args: Any) -> Tuple[Any, ...]:
    """``args`` of a Function's ``apply`` cast as its forward declares, differentiably (see the module doc).

    Args:
        cast_inputs: the Function's declaration, as given to :func:`autocast_forward`.
        *args: the arguments of ``apply``.

    Returns:
        ``args``, floating-point tensors (not fp64) on the device of the first tensor cast to the
        declared dtype inside an autocast region of that device; unchanged outside one.
    """
    device_type = device_type_of(args)
    dtype = _target_dtype(cast_inputs, device_type)
    return args if dtype is None else tuple(_cast(a, device_type, dtype) for a in args)


def in_float32(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in fp32 with autocast off when an autocast region of the inputs' device is active
    (floating-point tensor arguments cast to fp32, differentiably); plain ``fn(*args)`` otherwise."""
    device_type = device_type_of(args)
    if _target_dtype(torch.float32, device_type) is None:
        return fn(*args)
    with torch.autocast(device_type, enabled=False):
        return fn(*(_cast(a, device_type, torch.float32) for a in args))
