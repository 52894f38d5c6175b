"""Few-shot methods: the base classes, the shared inner loop and support-set training, and the three NSL
strategies (Sec. 7.2 of the paper).

Importing this package registers ``static_nsn``, ``dynamic_nsn`` and ``meta_static_nsn``.
"""
from .adaptation import (
    LOSS_REDUCTIONS,
    AdaptedNetwork,
    GradientAdaptedMethod,
    check_head_ways,
    drop_batchnorm_scale,
    episode_cross_entropy,
    sgd_inner_loop,
    use_batch_statistics,
)
from .base import FewShotMethod
from .dynamic_nsn import DynamicNSN
from .head_training import OPTIMIZERS, fit_linear_head, make_optimizer, train_on_support
from .meta_static_nsn import MetaStaticNSN
from .static_nsn import StaticNSN

__all__ = [
    "FewShotMethod",
    "GradientAdaptedMethod",
    "StaticNSN",
    "DynamicNSN",
    "MetaStaticNSN",
    "AdaptedNetwork",
    "sgd_inner_loop",
    "check_head_ways",
    "use_batch_statistics",
    "drop_batchnorm_scale",
    "episode_cross_entropy",
    "LOSS_REDUCTIONS",
    "OPTIMIZERS",
    "make_optimizer",
    "train_on_support",
    "fit_linear_head",
]
