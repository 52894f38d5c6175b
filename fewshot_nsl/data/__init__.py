"""Dataset sources (embedded ``glyphs``, Mini-ImageNet formats, custom), the store and episodes."""
from . import formats, glyphs  # noqa: F401  (register datasets)
from .store import ImageStore

__all__ = ["ImageStore"]
