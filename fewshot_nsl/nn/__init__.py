"""Neural-similarity layers (NSL, Liu et al., NeurIPS 2019, Sec. 3-4).

* :class:`NSConv2d`: ``W^T diag(M_s, ..., M_s) X`` with a static or dynamic (predicted) ``M_s``.
* :class:`SphereConv2d`, :class:`PredictorCore`, :class:`SimilarityPredictor`: the dynamic predictors.
* :func:`make_conv_factory`: conv factories for the backbones (``"plain"``, ``"static"``, ``"dynamic"``).
* :func:`wrap_convs_static`, :func:`fold_all`, :func:`similarity_parameters`,
  :func:`similarity_regularization`: whole-model helpers.
* :func:`ns_conv2d` (efficient), :func:`ns_conv_reference` (unfold), :func:`sphere_conv2d`: functional forms.
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
from .functional import conv_output_size, ns_conv2d, ns_conv_reference, resolve_padding, sphere_conv2d
from .nsconv import NSConv2d
from .sphere import PredictorCore, SimilarityPredictor, SphereConv2d

__all__ = [
    "NSConv2d",
    "SphereConv2d",
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
    "resolve_padding",
    "conv_output_size",
]
