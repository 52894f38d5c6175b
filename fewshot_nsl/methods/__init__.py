"""Few-shot methods: the base class and the three NSL strategies (Sec. 7.2 of the paper)."""
from .base import FewShotMethod

__all__ = ["FewShotMethod"]
