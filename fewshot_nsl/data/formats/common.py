"""Constants, the canonical Mini-ImageNet split, the per-class source record and small helpers
shared by the readers (see the package docstring)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from ...errors import DataError
from ...errors import one_line as _one_line  # the name the readers import
from ...safe_io import check_regular_file
from ..store import SPLITS

# ----------------------------------------------------------------------------- constants

PACKAGE_DATA = Path(__file__).resolve().parents[1]
#: Canonical Ravi & Larochelle class split (copied from ``../shared/data``).
SPLIT_FILE = PACKAGE_DATA / "miniimagenet_split.json"
#: Canonical Ravi & Larochelle CSVs (``train.csv``, ``val.csv``, ``test.csv``; MIT licence).
RAVI_CSV_DIR = PACKAGE_DATA / "miniimagenet_ravi"
_SHARED_SPLIT_FILE = Path(__file__).resolve().parents[4] / "shared" / "data" / "miniimagenet_ravi_split.json"

EXPECTED_CLASSES = {"train": 64, "val": 16, "test": 20}
#: Images per Mini-ImageNet class; ``None`` skips the check (tests use tiny sources).
EXPECTED_PER_CLASS: Optional[int] = 600

FORMAT_RAVI = "ravi-csv"
FORMAT_L2L = "learn2learn-pickle"
FORMAT_METAOPTNET = "metaoptnet-pickle"
FORMAT_HDF5 = "torchmeta-hdf5"
FORMAT_FOLDERS = "class-folders"
ALL_FORMATS = (FORMAT_RAVI, FORMAT_L2L, FORMAT_METAOPTNET, FORMAT_HDF5, FORMAT_FOLDERS)
CUSTOM_FORMATS = (FORMAT_RAVI, FORMAT_FOLDERS)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
#: Bump when the decoding or the cache key changes, so that old caches are not reused
#: (2: 16-bit and transparent images converted by ``images.to_rgb``; the key covers the listing).
_CACHE_VERSION = 2
#: Show a progress bar from this many images on.
_PROGRESS_MIN = 2000
#: Images decoded per thread-pool task (PIL releases the GIL while decoding).
_DECODE_CHUNK = 64

_L2L_FILES = {
    "train": ("mini-imagenet-cache-train.pkl",),
    "val": ("mini-imagenet-cache-validation.pkl", "mini-imagenet-cache-val.pkl"),
    "test": ("mini-imagenet-cache-test.pkl",),
}
_METAOPTNET_FILES = {
    "train": "miniImageNet_category_split_train_phase_train.pickle",
    "val": "miniImageNet_category_split_val.pickle",
    "test": "miniImageNet_category_split_test.pickle",
}

_LAYOUT_HELP = (
    "images/+train.csv, mini-imagenet-cache-*.pkl, miniImageNet_category_split_*.pickle, "
    "*_data.hdf5 or train/val/test class folders"
)
_CUSTOM_HELP = (
    "images/ + train.csv/test.csv (val.csv optional) or train/<class>/, test/<class>/ (val/ optional) folders"
)


# ----------------------------------------------------------------------------- canonical split


def canonical_split(path: Optional[Path] = None) -> Dict[str, List[str]]:
    """The Ravi & Larochelle Mini-ImageNet wnid lists.

    Args:
        path: split JSON; default the package copy (falling back to ``../shared/data``).

    Returns:
        ``{"train": [64 wnids], "val": [16], "test": [20]}`` in the file's order.
    """
    if path is None:
        path = SPLIT_FILE if SPLIT_FILE.is_file() else _SHARED_SPLIT_FILE
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        split = {s: [str(w) for w in raw[s]] for s in SPLITS}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"canonical split file {path} is unreadable ({_one_line(exc)}); reinstall fewshot_nsl"
        ) from None
    for s in SPLITS:
        if len(split[s]) != EXPECTED_CLASSES[s] or len(set(split[s])) != len(split[s]):
            raise DataError(f"canonical split file {path} has a bad {s} list; reinstall fewshot_nsl")
    return split


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is (a link to) a folder; False for a symlink loop or a broken link."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_file(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is (a link to) a regular file; False for a symlink loop or a broken link."""
    try:
        return entry.is_file()
    except OSError:
        return False


def _sniff(path: Path, what: str) -> None:
    """Refuse a non-regular file (FIFO, socket, device, symlink loop: checked without opening it,
    which would block on a FIFO), an empty file or an HTML page (a failed download) saved under a
    data file name."""
    check_regular_file(path, what, DataError)
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError as exc:
        raise DataError(f"cannot read {path} ({_one_line(exc)}); check its permissions") from None
    if not head:
        raise DataError(f"{path} is empty (0 bytes); re-download it")
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if start.startswith(b"<!doctype") or start.startswith(b"<html"):
        raise DataError(
            f"{path} is an HTML page, not a {what} (probably a failed Google Drive download); re-download it"
        )


# ----------------------------------------------------------------------------- class sources


@dataclass
class ClassSource:
    """One class of a source, before decoding.

    Attributes:
        name: class name (wnid for Mini-ImageNet).
        split: split the source puts it in.
        origin: file or folder it comes from (for messages).
        count: number of images.
        paths: image files in rank order (file formats), or None.
        read: returns ``uint8`` ``(count, H, W, 3)`` in rank order (array formats), or None.
    """

    name: str
    split: str
    origin: Path
    count: int
    paths: Optional[List[Path]] = None
    read: Optional[Callable[[], np.ndarray]] = None
