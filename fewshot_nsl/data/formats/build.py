"""Reading a source (dispatch to the readers), the class checks and order, and building the store
(cached through :func:`fewshot_nsl.data.store.load_or_build`); the registered ``miniimagenet`` and
``custom`` datasets."""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ...errors import ConfigError, DataError
from ...registry import register_dataset
from ..store import SPLITS, ImageStore, load_or_build, stores_dir
from .common import (
    _CUSTOM_HELP,
    _LAYOUT_HELP,
    ALL_FORMATS,
    CUSTOM_FORMATS,
    EXPECTED_PER_CLASS,
    ClassSource,
    canonical_split,
)
from .detect import _check_root, cache_key, detect_format, locate_split_files
from .images import ImageModeWarning, conversion_note, materialize
from .listing import SourceListing, list_source, read_classes


def scan_source(root: Path, fmt: str, layout: Dict[str, Tuple[Path, ...]]) -> List[ClassSource]:
    """The classes of a source (its :func:`~.listing.list_source`, then :func:`~.listing.read_classes`);
    one :class:`ClassSource` per class."""
    return read_classes(list_source(root, fmt, layout))


# ----------------------------------------------------------------------------- checks and order


def check_unique_classes(classes: List[ClassSource]) -> None:
    """Every class in exactly one split (and listed once)."""
    first: Dict[str, ClassSource] = {}
    for c in classes:
        if c.name in first:
            other = first[c.name]
            where = "twice in the" if other.split == c.split else f"in both the {other.split} and the"
            raise DataError(
                f"class {c.name} is {where} {c.split} split ({other.origin} and {c.origin}); "
                f"keep it in exactly one split"
            )
        first[c.name] = c


def check_canonical(
    classes: List[ClassSource],
    canonical: Dict[str, List[str]],
    expected_per_class: Optional[int],
    root: Optional[Path] = None,
) -> None:
    """Check the classes are exactly the canonical Ravi classes, in their splits, of the expected size.

    Args:
        classes: classes found in the source.
        canonical: ``{split: [wnid, ...]}``.
        expected_per_class: images per class, or None to skip that check.
        root: the data root, for messages.

    Raises:
        DataError: an unknown wnid, a class in the wrong split, a missing class, or a wrong count.
    """
    home = {w: s for s in SPLITS for w in canonical[s]}
    fix = ("fix the source, or accept its splits explicitly with allow_noncanonical_split=True "
           "(--config FILE with 'dataset_options: {allow_noncanonical_split: true}'), or use --dataset custom")
    for c in classes:
        if c.name not in home:
            raise DataError(f"class {c.name} in {c.origin} is not a Mini-ImageNet class of the Ravi split; {fix}")
        if home[c.name] != c.split:
            raise DataError(
                f"class {c.name} is in the {c.split} split in {c.origin} but in {home[c.name]} in the "
                f"canonical Ravi split; {fix}"
            )
    present = {c.name for c in classes}
    for s in SPLITS:
        missing = [w for w in canonical[s] if w not in present]
        if missing:
            have = len(canonical[s]) - len(missing)
            where = f" in {root}" if root else ""
            more = " and more" if len(missing) > 1 else ""
            raise DataError(
                f"the {s} split{where} has {have} of its {len(canonical[s])} Mini-ImageNet classes "
                f"(missing {missing[0]}{more}); the source is incomplete: re-download it, or {fix.split(', or ', 1)[1]}"
            )
    if expected_per_class is not None:
        for c in classes:
            if c.count != expected_per_class:
                raise DataError(
                    f"class {c.name} in {c.origin} has {c.count} images, expected {expected_per_class}; "
                    f"the source is incomplete, re-download it"
                )


def order_classes(
    classes: List[ClassSource], canonical: Optional[Dict[str, List[str]]] = None
) -> List[ClassSource]:
    """Canonical class order: train, then val, then test; within a split, the canonical list
    order for known wnids, then the source order."""
    position = {w: i for s in SPLITS for i, w in enumerate(canonical[s])} if canonical else {}
    indexed = list(enumerate(classes))
    indexed.sort(key=lambda ic: (SPLITS.index(ic[1].split), position.get(ic[1].name, len(position)), ic[0]))
    return [c for _, c in indexed]


# ----------------------------------------------------------------------------- builder


def build_store(
    data_root: Optional[str],
    *,
    dataset: str = "miniimagenet",
    cache_dir: Optional[str] = None,
    image_size: int = 84,
    allow_noncanonical_split: bool = False,
    expected_per_class: Optional[int] = 600,
    use_cache: bool = True,
) -> ImageStore:
    """Load a Mini-ImageNet (``dataset="miniimagenet"``) or custom (``"custom"``) source.

    Args:
        data_root: folder holding one of the supported layouts.
        dataset: ``"miniimagenet"`` (canonical split checks, all five formats) or ``"custom"``
            (splits from the files, Ravi-style or class folders, val optional).
        cache_dir: where decoded stores are cached; default ``default_cache_dir() / "stores"``.
        image_size: side ``S`` of the stored images ``(N, S, S, 3)``.
        allow_noncanonical_split: Mini-ImageNet only: keep the splits the source implies and
            skip the class and count checks.
        expected_per_class: Mini-ImageNet only: images per class (``None`` skips the check).
        use_cache: read and write the cache.

    Returns:
        The store (memory-mapped from the cache when it was written).

    Raises:
        DataError: one line naming the bad file and the fix.
    """
    if dataset not in ("miniimagenet", "custom"):
        raise ConfigError(f"unknown dataset kind '{dataset}'; use miniimagenet or custom")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ConfigError(f"image_size must be an integer >= 8, got {image_size!r}")
    mini = dataset == "miniimagenet"
    what = "Mini-ImageNet" if mini else "custom dataset"
    root = _check_root(data_root, what, _LAYOUT_HELP if mini else _CUSTOM_HELP)
    fmt = detect_format(root, ALL_FORMATS if mini else CUSTOM_FORMATS, what)
    layout = locate_split_files(root, fmt, SPLITS if mini else ("train", "test"))

    options = {"dataset": dataset}
    if mini:
        options.update(noncanonical=bool(allow_noncanonical_split), per_class=expected_per_class)
    # one listing: the cache key is computed from it and the store is decoded from it
    listing = list_source(root, fmt, layout)
    store_dir = stores_dir(cache_dir) / f"{dataset}-{cache_key(listing, image_size, options)}"

    def decode() -> ImageStore:
        return _decode(listing, dataset, image_size, allow_noncanonical_split, expected_per_class, what)

    return load_or_build(store_dir, decode, dataset, use_cache=use_cache)


def _decode(
    listing: SourceListing,
    dataset: str,
    image_size: int,
    allow_noncanonical_split: bool,
    expected_per_class: Optional[int],
    what: str,
) -> ImageStore:
    """Read, check, order and decode the classes of ``listing`` into a store (see :func:`build_store`).

    Says once (a warning) which image modes were converted to 8-bit RGB; the store keeps that line
    as ``decode_note`` and the listed files as ``source_files``.
    """
    mini = dataset == "miniimagenet"
    classes = read_classes(listing)
    check_unique_classes(classes)
    canonical = canonical_split() if mini else None
    if mini and not allow_noncanonical_split:
        assert canonical is not None
        check_canonical(classes, canonical, expected_per_class, listing.root)
    classes = order_classes(classes, canonical)
    converted: Counter = Counter()
    images, labels = materialize(classes, image_size, converted)
    note = conversion_note(converted, len(images))
    if note:
        note = f"{what} at {listing.root}: {note}"
        warnings.warn(note, ImageModeWarning)
    return ImageStore(
        dataset,
        images,
        labels,
        [c.name for c in classes],
        [c.split for c in classes],
        synthetic=False,
        source=f"{listing.fmt} at {listing.root}",
        source_files=tuple(str(p) for p in listing.files),
        decode_note=note,
    )


@register_dataset("miniimagenet")
def load_miniimagenet(
    data_root: Optional[str] = None,
    cache_dir: Optional[str] = None,
    image_size: int = 84,
    allow_noncanonical_split: bool = False,
) -> ImageStore:
    """Mini-ImageNet (Ravi & Larochelle split) from any supported on-disk format.

    Args:
        data_root: folder with ``images/`` + ``train.csv``/``val.csv``/``test.csv``,
            ``mini-imagenet-cache-*.pkl``, ``miniImageNet_category_split_*.pickle``,
            ``{split}_data.hdf5`` + ``{split}_labels.json`` or ``{train,val,test}/<wnid>/``.
        cache_dir: cache folder; default ``default_cache_dir() / "stores"``.
        image_size: side ``S`` of the stored images ``(N, S, S, 3)``.
        allow_noncanonical_split: keep the splits the source implies and skip the
            64/16/20-classes and 600-images checks (every class must still be in one split).

    Returns:
        Store named ``"miniimagenet"``: classes are the train wnids (split-file order), then
        val, then test; ``N = 60000`` for the canonical source.
    """
    return build_store(
        data_root,
        dataset="miniimagenet",
        cache_dir=cache_dir,
        image_size=image_size,
        allow_noncanonical_split=allow_noncanonical_split,
        expected_per_class=EXPECTED_PER_CLASS,
    )


@register_dataset("custom")
def load_custom(
    data_root: Optional[str] = None, cache_dir: Optional[str] = None, image_size: int = 84,
    label: Optional[str] = None,
) -> ImageStore:
    """The user's own dataset: ``images/`` + ``train.csv``/``test.csv`` (``val.csv`` optional,
    any class names in the ``label`` column) or ``train/<class>/``, ``test/<class>/``
    (``val/`` optional) folders of ``.jpg``/``.png`` images.

    Every image is resized to ``image_size x image_size`` when the store is built (the store's
    ``decode_note`` says so, for the console); the content fingerprint is taken from the stored
    (resized) pixels, so it changes with the image size.

    Args:
        data_root: the folder.
        cache_dir: cache folder; default ``default_cache_dir() / "stores"``.
        image_size: side ``S`` of the stored images ``(N, S, S, 3)``.
        label: the dataset's name in tables, run folders and episode lists (``--dataset-name``);
            default ``custom``.

    Returns:
        Store named ``label`` (default ``"custom"``); splits as in the files, classes ordered train,
        val, test (within a split, in the order of the source).

    Raises:
        ConfigError: a ``label`` that is not a folder-safe name or is a registered dataset's name.
    """
    name = "custom"
    if label is not None:
        from ...inputs import path_name
        from ...registry import DATASETS

        name = path_name(label, "--dataset-name (dataset_options.label)")
        if name in DATASETS and name != "custom":
            raise ConfigError(f"--dataset-name {name} is the name of the built-in dataset {name}; "
                              f"choose another name for your data")
    store = build_store(data_root, dataset="custom", cache_dir=cache_dir, image_size=image_size)
    store.name = name
    resized = (f"{name} at {data_root}: images resized to {image_size}x{image_size} px (--image-size) where they "
               f"are not; the content fingerprint is taken after resizing")
    store.decode_note = "; ".join(n for n in (resized, store.decode_note) if n)
    return store
