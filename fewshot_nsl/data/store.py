"""The canonical in-memory image store every dataset source is converted to.

An :class:`ImageStore` holds

* ``images``: ``uint8`` array ``(N, H, W, 3)`` (usually a read-only ``np.memmap``),
* ``labels``: ``int64`` array ``(N,)`` indexing ``class_names``,
* ``class_names``: one name per class (wnids for Mini-ImageNet),
* ``class_splits``: ``"train" | "val" | "test"`` per class.

Images are kept in canonical order: grouped by class (in ``class_names`` order), and
within a class by rank (the order of the source: CSV row order for Ravi & Larochelle,
sorted file names for folders, list order for pickles). An image is therefore addressed
by ``(class name, rank within class)``, which is what episode files store.

:func:`load_or_build` is the one disk cache of every source (``glyphs``, Mini-ImageNet, custom): a
valid cached store is memory-mapped; otherwise one process builds and writes it, under a lock, while
others wait and then load it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError, one_line
from ..safe_io import locked, tmp_path

SPLITS = ("train", "val", "test")


def default_cache_dir() -> Path:
    """``$FEWSHOT_NSL_CACHE`` or ``~/.cache/fewshot_nsl``."""
    return Path(os.environ.get("FEWSHOT_NSL_CACHE", Path.home() / ".cache" / "fewshot_nsl"))


@dataclass
class ImageStore:
    """Images, labels, class names and class splits of one dataset, in canonical order.

    Attributes:
        name: dataset name ("glyphs", "miniimagenet", "custom").
        images: ``uint8`` ``(N, H, W, 3)``.
        labels: ``int64`` ``(N,)``, non-decreasing (grouped by class).
        class_names: ``C`` names.
        class_splits: ``C`` split names.
        synthetic: True for generated data whose numbers are not comparable to real data.
        source: human-readable description of where the data came from.
        source_files: absolute paths of every file the store was read from: the listing its
            cache key was computed from (:mod:`fewshot_nsl.data.formats.listing`); empty for
            generated data.
        decode_note: one line saying which image modes were converted to 8-bit RGB while
            decoding (``""`` if none), for the console.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: List[str]
    class_splits: List[str]
    synthetic: bool = False
    source: str = ""
    source_files: Tuple[str, ...] = ()
    decode_note: str = ""
    _offsets: np.ndarray = field(init=False, repr=False)
    _fingerprint: Optional[str] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.source_files = tuple(str(p) for p in self.source_files)
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise DataError(
                f"{self.name}: images must be uint8 (N, H, W, 3), got {self.images.dtype} "
                f"{tuple(self.images.shape)}; convert the source to RGB uint8"
            )
        if len(self.labels) != len(self.images):
            raise DataError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
        if len(self.class_names) != len(self.class_splits):
            raise DataError(f"{self.name}: class_names and class_splits differ in length")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DataError(
                f"{self.name}: labels out of range 0..{len(self.class_names) - 1}; "
                f"check the label column of the source"
            )
        if np.any(np.diff(self.labels) < 0):
            raise DataError(f"{self.name}: images are not grouped by class; build it with ImageStore.from_unsorted")
        bad = sorted(set(self.class_splits) - set(SPLITS))
        if bad:
            raise DataError(f"{self.name}: unknown split name(s) {bad}; use train/val/test")
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_unsorted(
        cls,
        name: str,
        images: np.ndarray,
        labels: Sequence[int],
        class_names: List[str],
        class_splits: List[str],
        **kwargs,
    ) -> "ImageStore":
        """Build a store from images in any order; a stable sort keeps within-class order."""
        labels = np.asarray(labels, dtype=np.int64)
        order = np.argsort(labels, kind="stable")
        if np.any(order != np.arange(len(order))):
            images = images[order]
            labels = labels[order]
        return cls(name, images, labels, list(class_names), list(class_splits), **kwargs)

    # ------------------------------------------------------------------ queries
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple:
        """``(H, W, 3)``."""
        return tuple(self.images.shape[1:])

    def class_size(self, c: int) -> int:
        return int(self._offsets[c + 1] - self._offsets[c])

    def class_members(self, c: int) -> np.ndarray:
        """Store indices of class ``c`` in rank order, ``int64 (n_c,)``."""
        return np.arange(self._offsets[c], self._offsets[c + 1], dtype=np.int64)

    def index_of(self, c: int, ranks: Sequence[int]) -> np.ndarray:
        """Store indices of the images of class ``c`` with the given ranks."""
        ranks = np.asarray(ranks, dtype=np.int64)
        if len(ranks) and (ranks.min() < 0 or ranks.max() >= self.class_size(c)):
            raise DataError(
                f"{self.name}: class {self.class_names[c]} has {self.class_size(c)} images, "
                f"an episode asks for rank {int(ranks.max())}; the episode list does not match this dataset"
            )
        return self._offsets[c] + ranks

    def classes_in_split(self, split: str) -> List[int]:
        """Class indices belonging to ``split``, in class order."""
        if split not in SPLITS:
            raise DataError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
        return [i for i, s in enumerate(self.class_splits) if s == split]

    def class_index(self) -> Dict[str, int]:
        return {n: i for i, n in enumerate(self.class_names)}

    def split_counts(self) -> Dict[str, int]:
        return {s: len(self.classes_in_split(s)) for s in SPLITS}

    def fingerprint(self) -> str:
        """sha256 (hex, 16 chars) of the metadata and all image bytes; cached."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps([self.class_names, self.class_splits]).encode())
            h.update(self.labels.tobytes())
            h.update(str(self.images.shape).encode())
            chunk = 4096
            for i in range(0, len(self.images), chunk):
                h.update(np.ascontiguousarray(self.images[i : i + chunk]).tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    # ------------------------------------------------------------------ disk cache
    def save(self, directory: Path) -> None:
        """Write the store to ``directory`` (``images.npy`` + ``labels.npy`` + ``files.json`` (the
        source files) + ``meta.json``) atomically."""
        directory = Path(directory)
        tmp = tmp_path(directory)  # this process's and thread's own name, never a user's file
        tmp.mkdir(parents=True, exist_ok=True)
        np.save(tmp / "images.npy", np.ascontiguousarray(self.images))
        np.save(tmp / "labels.npy", self.labels)
        meta = {
            "name": self.name,
            "class_names": self.class_names,
            "class_splits": self.class_splits,
            "synthetic": self.synthetic,
            "source": self.source,
            "fingerprint": self.fingerprint(),
            "decode_note": self.decode_note,
        }
        (tmp / "files.json").write_text(json.dumps(list(self.source_files)))
        (tmp / "meta.json").write_text(json.dumps(meta))
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)

    @classmethod
    def load(cls, directory: Path) -> "ImageStore":
        """Memory-map a store written by :meth:`save`."""
        directory = Path(directory)
        meta = json.loads((directory / "meta.json").read_text())
        images = np.load(directory / "images.npy", mmap_mode="r")
        labels = np.load(directory / "labels.npy")
        files = directory / "files.json"
        store = cls(
            meta["name"],
            images,
            labels,
            meta["class_names"],
            meta["class_splits"],
            synthetic=meta["synthetic"],
            source=meta["source"],
            source_files=tuple(json.loads(files.read_text())) if files.is_file() else (),
            decode_note=meta.get("decode_note", ""),
        )
        store._fingerprint = meta.get("fingerprint")
        return store

    @staticmethod
    def is_cached(directory: Path) -> bool:
        return (Path(directory) / "meta.json").is_file()


def stores_dir(cache_dir: Optional[str] = None) -> Path:
    """Where dataset stores are cached: ``cache_dir``, or ``default_cache_dir() / "stores"``."""
    return Path(cache_dir) if cache_dir is not None else default_cache_dir() / "stores"


def load_or_build(
    directory: Path,
    build: Callable[[], ImageStore],
    what: str,
    check: Optional[Callable[[ImageStore], Optional[str]]] = None,
    use_cache: bool = True,
) -> ImageStore:
    """The store cached in ``directory``, or ``build()`` written there first (safe under concurrency).

    A cached store that loads and passes ``check`` is memory-mapped and returned at once. Otherwise the
    cache is (re)built under an exclusive lock (``<directory>.lock``, removed afterwards): a process that
    waited for it finds the store another one wrote and loads it instead of building it again. The store
    is written atomically (:meth:`ImageStore.save`: a temporary folder renamed into place), so readers
    never see half a cache. A damaged cache is rebuilt with a warning; a cache that cannot be written
    (read-only or full folder) gives the built store in memory, with a warning.

    Args:
        directory: the cache folder of this store (its name is the cache key).
        build: makes the store (decoding or rendering the source).
        what: the source, for warnings (``"glyphs"``, ``"miniimagenet"``).
        check: why a loaded store cannot be used, or ``None`` if it can (e.g. a checksum test).
        use_cache: ``False``: neither read nor write the cache, just ``build()``.

    Returns:
        The store, memory-mapped from ``directory`` when it could be written.
    """
    if not use_cache:
        return build()
    directory = Path(directory)

    def cached() -> tuple:
        """``(store or None, why the cache was not usable or None)``."""
        if not ImageStore.is_cached(directory):
            return None, None
        try:
            store = ImageStore.load(directory)
            problem = check(store) if check is not None else None
        except Exception as exc:  # unreadable or truncated cache: rebuild
            return None, f"cannot be read ({one_line(exc)})"
        return (store, None) if problem is None else (None, problem)

    store, _ = cached()
    if store is not None:
        return store
    with ExitStack() as stack:
        try:
            stack.enter_context(locked(directory, remove=True))
        except OSError:
            pass  # no lock file in an unwritable folder; writing the cache will fail below and say so
        store, problem = cached()  # another process may have built it while we waited
        if store is not None:
            return store
        if problem is not None:
            warnings.warn(f"{what}: cached store {directory} {problem}; rebuilding it", stacklevel=3)
        store = build()
        try:
            store.save(directory)
        except OSError as exc:
            shutil.rmtree(tmp_path(directory), ignore_errors=True)
            if ImageStore.is_cached(directory):  # written meanwhile by a process without the lock
                return ImageStore.load(directory)
            warnings.warn(
                f"{what}: cannot write the cache {directory} ({one_line(exc)}); using the store in memory "
                f"(it is built again next time)", stacklevel=3,
            )
            return store
        return ImageStore.load(directory)


def check_min_images(store: ImageStore, split: str, needed: int) -> None:
    """Refuse a split having a class with fewer than ``needed`` (= shots + queries) images."""
    for c in store.classes_in_split(split):
        if store.class_size(c) < needed:
            raise DataError(
                f"{store.name}: class {store.class_names[c]} ({split}) has {store.class_size(c)} images, "
                f"fewer than shots+queries={needed}; lower --shots/--queries or fix the source"
            )
