"""Functional forms of the neural-similarity convolution and of SphereConv: a re-export, kept so that
``fewshot_nsl.nn.functional`` imports keep working. The code lives by concern, each autograd Function
beside the op it serves:

* :mod:`fewshot_nsl.nn.geometry`: int-or-pair arguments, explicit padding, output sizes, tap slices.
* :mod:`fewshot_nsl.nn.ns_conv_ops`: :func:`ns_conv2d` (static fold, choice of side, notation) and
  :func:`ns_conv_reference`.
* :mod:`fewshot_nsl.nn.sides`: the ``"input"`` and ``"output"`` sides (``_MixInputTaps``, ``_GatherOutputTaps``).
* :mod:`fewshot_nsl.nn.taps`: the ``"taps"`` side (``_AccumulateTaps``).
* :mod:`fewshot_nsl.nn.sphere_ops`: :func:`sphere_conv2d`, :func:`input_normalized_conv2d` (``_SphereConv``).
* :mod:`fewshot_nsl.nn.amp`: how those Functions behave under ``torch.autocast``.

Patch constants and helpers in the module that defines them (e.g. ``fewshot_nsl.nn.taps.TAPS_CHUNK_BYTES``);
the names below are the same objects, so patching them here changes nothing.
"""
from __future__ import annotations

from .geometry import IntPair, Padding, _pair, _tap_slices, conv_output_size, resolve_padding  # noqa: F401
from .ns_conv_ops import (  # noqa: F401
    SIDES,
    TAPS_MAX_POSITION_RATIO,
    TAPS_MIN_CHANNELS,
    _check_similarity,
    _static_weight,
    choose_side,
    ns_conv2d,
    ns_conv_reference,
)
from .sphere_ops import (  # noqa: F401
    _patch_normalized_conv,
    _sphere_conv_ops,
    _squared_patch_norms,
    _unit_filters,
    _window_sums,
    _window_sums_adjoint,
    input_normalized_conv2d,
    sphere_conv2d,
)
from .taps import TAPS_CHUNK_BYTES, TAPS_MAX_CHUNK_BYTES, taps_conv as _taps_conv  # noqa: F401

__all__ = [
    "ns_conv2d",
    "ns_conv_reference",
    "sphere_conv2d",
    "input_normalized_conv2d",
    "resolve_padding",
    "conv_output_size",
]
