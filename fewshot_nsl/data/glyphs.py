"""The embedded default dataset ``glyphs``: synthetic characters for offline runs (the registered, cached store).

With no Mini-ImageNet on disk the suite still runs, offline, on ``glyphs``: 100 classes
(one per character of the Latin, Greek, Cyrillic, Armenian and Georgian scripts, 20 per
script) rendered from the TrueType fonts shipped inside the matplotlib wheel (DejaVu
Sans / Serif / Sans Mono and STIXGeneral, four styles each), split 64/16/20 into
train/val/test classes like Mini-ImageNet.

The dataset is three modules:

* :mod:`fewshot_nsl.data.glyph_classes`: fonts, candidate characters, look-alike checks, the
  choice of the classes and their split;
* :mod:`fewshot_nsl.data.glyph_render`: drawing the seeded images, the store in memory, the preview;
* this module: the registered dataset :func:`load_glyphs` and its cache. Every public name of the
  other two is importable from here too.

The result is cached as an :class:`ImageStore` under
``<cache_dir>/glyphs-v<GLYPHS_VERSION>-s<seed>-n<images_per_class>-<image_size>`` and
memory-mapped on later calls (:func:`fewshot_nsl.data.store.load_or_build`); the fingerprint
recorded in ``meta.json`` is checked on every load and the store is regenerated (with a warning)
if it does not match.

``glyphs`` is synthetic and labelled as such everywhere (``store.synthetic``,
``store.source``); its numbers are not comparable with Mini-ImageNet numbers.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import ConfigError
from ..registry import register_dataset
from .glyph_classes import (
    CLASSES_PER_SCRIPT,
    CONFUSABLES,
    DISTRACTOR_THRESHOLD,
    DISTRACTORS,
    FONT_FILES,
    GLYPHS_VERSION,
    MIN_FONTS,
    NAME,
    REFERENCE_FONT,
    SCRIPT_RANGES,
    SCRIPTS,
    SIMILARITY_THRESHOLD,
    SOURCE,
    SPLIT_QUOTAS,
    SPLIT_SEED,
    SPLIT_SIZES,
    GlyphClass,
    charmaps,
    class_name,
    distractor_chars,
    font_dir,
    font_paths,
    fonts_covering,
    load_font,
    normalized_render,
    select_classes,
    shape_similarity,
    similarity_matrix,
    too_similar,
)
from .glyph_render import (
    ASPECT,
    BLUR_PROB,
    DISTRACTOR_FONTS,
    DISTRACTOR_GLYPH_HEIGHT,
    DISTRACTOR_GLYPH_PROB,
    DISTRACTOR_STROKES,
    GLYPH_HEIGHT,
    MIN_CONTRAST,
    NOISE_STD,
    OCCLUSION_PROB,
    OCCLUSION_SIZE,
    ROTATION_DEG,
    SHEAR,
    STROKE_WIDTH,
    THIN_PROB,
    TRANSLATION,
    generate_glyphs,
    render_class,
    render_image,
    render_preview,
)
from .store import ImageStore, load_or_build, stores_dir

#: The name :func:`similarity_matrix` had before the module was split (kept for callers of the old name).
_similarity_matrix = similarity_matrix

__all__ = [
    # the registered dataset and its cache
    "load_glyphs", "cache_name",
    # classes (glyph_classes)
    "GLYPHS_VERSION", "NAME", "SOURCE", "SCRIPTS", "CLASSES_PER_SCRIPT", "SPLIT_SIZES", "MIN_FONTS", "SPLIT_SEED",
    "SPLIT_QUOTAS", "FONT_FILES", "REFERENCE_FONT", "SCRIPT_RANGES", "CONFUSABLES", "SIMILARITY_THRESHOLD",
    "DISTRACTORS", "DISTRACTOR_THRESHOLD", "GlyphClass", "font_dir", "font_paths", "charmaps", "fonts_covering",
    "load_font", "class_name", "normalized_render", "similarity_matrix", "shape_similarity", "too_similar",
    "select_classes", "distractor_chars",
    # rendering (glyph_render)
    "GLYPH_HEIGHT", "ROTATION_DEG", "SHEAR", "ASPECT", "TRANSLATION", "STROKE_WIDTH", "THIN_PROB", "MIN_CONTRAST",
    "DISTRACTOR_GLYPH_PROB", "DISTRACTOR_GLYPH_HEIGHT", "DISTRACTOR_STROKES", "OCCLUSION_PROB", "OCCLUSION_SIZE",
    "BLUR_PROB", "NOISE_STD", "DISTRACTOR_FONTS", "render_image", "render_class", "generate_glyphs",
    "render_preview",
]


def cache_name(seed: int, images_per_class: int, image_size: int) -> str:
    """Cache folder name, e.g. ``glyphs-v1-s0-n80-84``."""
    return f"glyphs-v{GLYPHS_VERSION}-s{seed}-n{images_per_class}-{image_size}"


def _check_cached(store: ImageStore, images_per_class: int, image_size: int) -> Optional[str]:
    """Why a cached store cannot be used, or None if it matches and its bytes check out."""
    classes = select_classes()
    if store.name != NAME or not store.synthetic:
        return f"is not a synthetic '{NAME}' store"
    if store.class_names != [g.name for g in classes] or store.class_splits != [g.split for g in classes]:
        return "has other classes or splits than this version selects"
    if tuple(store.images.shape) != (len(classes) * images_per_class, image_size, image_size, 3):
        return f"has images of shape {tuple(store.images.shape)}"
    if not np.array_equal(store.labels, np.repeat(np.arange(len(classes)), images_per_class)):
        return "has unexpected labels"
    recorded = store._fingerprint
    store._fingerprint = None  # recompute from the bytes on disk
    actual = store.fingerprint()
    if recorded != actual:
        return f"fails its checksum (meta.json records {recorded}, the files hash to {actual})"
    return None


@register_dataset(NAME)
def load_glyphs(
    data_root: Optional[str] = None,
    cache_dir: Optional[str] = None,
    image_size: int = 84,
    images_per_class: int = 80,
    seed: int = 0,
) -> ImageStore:
    """The embedded synthetic dataset: 100 character classes (64/16/20), RGB ``image_size``.

    Generated on first use (seconds) and cached under
    ``cache_dir/glyphs-v<GLYPHS_VERSION>-s<seed>-n<images_per_class>-<image_size>``
    (``cache_dir`` defaults to ``default_cache_dir()/"stores"``); later calls memory-map
    the cache after checking its fingerprint, and regenerate it with a warning if the check
    fails. ``data_root`` is accepted (the CLI passes it to every dataset) and ignored.
    """
    del data_root  # glyphs needs no data on disk
    checks = (("image_size", image_size, 16), ("images_per_class", images_per_class, 1), ("seed", seed, 0))
    for arg, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(f"glyphs: {arg} must be an integer >= {low}, got {value!r}")
    directory = stores_dir(cache_dir) / cache_name(int(seed), int(images_per_class), int(image_size))
    return load_or_build(
        directory,
        lambda: generate_glyphs(int(seed), int(images_per_class), int(image_size)),
        NAME,
        check=lambda store: _check_cached(store, images_per_class, image_size),
    )
