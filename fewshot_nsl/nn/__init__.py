"""Neural-similarity layers (NSL, Liu et al., NeurIPS 2019, Sec. 3-4).

* :class:`NSConv2d`: ``W^T diag(M_s, ..., M_s) X`` with a static or dynamic (predicted) ``M_s``.
* :class:`SphereConv2d`, :class:`PredictorCore`, :class:`SimilarityPredictor`: the dynamic predictors.
* :func:`make_conv_factory`: conv factories for the backbones (``"plain"``, ``"static"``, ``"dynamic"``).
* :func:`wrap_convs_static`, :func:`fold_all`, :func:`similarity_parameters`,
  :func:`similarity_regularization`: whole-model helpers.
* :func:`ns_conv2d` (efficient), :func:`ns_conv_reference` (unfold), :func:`sphere_conv2d`,
  :func:`input_normalized_conv2d`: functional forms (modules ``ns_conv_ops``, ``sides``, ``taps``,
  ``sphere_ops``; ``functional`` re-exports them). :class:`HeNormalConv2d`: the authors' conv init.
"""
from .factory import (
    FACTORY_OPTIONS,
    NSConvFactory,
    fold_all,
    make_conv_factory,
    similarity_parameters,
    similarity_regularization,
    wrap_convs_static,
)
from .geometry import conv_output_size, resolve_padding
from .ns_conv_ops import ns_conv2d, ns_conv_reference
from .nsconv import NSConv2d
from .sphere import HeNormalConv2d, PredictorCore, SimilarityPredictor, SphereConv2d
from .sphere_ops import input_normalized_conv2d, sphere_conv2d

__all__ = [
    "NSConv2d",
    "SphereConv2d",
    "HeNormalConv2d",
    "PredictorCore",
    "SimilarityPredictor",
    "NSConvFactory",
    "make_conv_factory",
    "FACTORY_OPTIONS",
    "wrap_convs_static",
    "fold_all",
    "similarity_parameters",
    "similarity_regularization",
    "ns_conv2d",
    "ns_conv_reference",
    "sphere_conv2d",
    "input_normalized_conv2d",
    "resolve_padding",
    "conv_output_size",
]
