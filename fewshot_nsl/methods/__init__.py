"""Few-shot methods: the base class and the three NSL strategies (Sec. 7.2 of the paper).

Importing this package registers ``static_nsn``, ``dynamic_nsn`` and ``meta_static_nsn``.
"""
from .base import FewShotMethod
from .dynamic_nsn import DynamicNSN
from .meta_static_nsn import MetaStaticNSN
from .static_nsn import StaticNSN

__all__ = ["FewShotMethod", "StaticNSN", "DynamicNSN", "MetaStaticNSN"]
