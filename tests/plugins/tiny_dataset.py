"""A tiny learnable dataset registered as ``tiny``: a plugin folder for tests (``--plugins tests/plugins``)."""
from __future__ import annotations

import numpy as np

from fewshot_nsl.data.store import ImageStore
from fewshot_nsl.registry import register_dataset


def make_tiny_store(n_classes: int = 25, per_class: int = 30, size: int = 16, seed: int = 0) -> ImageStore:
    """Classes differ by a colour and a stripe orientation, plus noise: easy but not trivial.

    Splits: first 60% train, next 20% val, last 20% test.
    """
    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, size=(n_classes, 3))
    images = np.empty((n_classes * per_class, size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    for c in range(n_classes):
        angle = np.pi * c / n_classes
        stripes = 40 * np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 0.9)
        for i in range(per_class):
            img = colours[c] + stripes[..., None] + rng.normal(0, 90, size=(size, size, 3))
            images[c * per_class + i] = np.clip(img, 0, 255).astype(np.uint8)
    n_train, n_val = int(0.6 * n_classes), int(0.2 * n_classes)
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * (n_classes - n_train - n_val)
    labels = np.repeat(np.arange(n_classes), per_class)
    return ImageStore("tiny", images, labels, [f"class{c:02d}" for c in range(n_classes)], splits, synthetic=True,
                      source="tests")


@register_dataset("tiny")
def load_tiny(data_root=None, cache_dir=None, image_size: int = 16, n_classes: int = 25, per_class: int = 30):
    """Tiny in-memory dataset for tests."""
    return make_tiny_store(n_classes, per_class, image_size)
