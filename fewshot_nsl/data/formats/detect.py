"""Which on-disk format a folder holds, where each split's files are, and the cache key over a source's
listing (:mod:`.listing`)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ...errors import DataError
from ...safe_io import check_regular_file
from ..store import SPLITS
from .common import (
    _CACHE_VERSION,
    _CUSTOM_HELP,
    _L2L_FILES,
    _LAYOUT_HELP,
    _METAOPTNET_FILES,
    ALL_FORMATS,
    FORMAT_FOLDERS,
    FORMAT_HDF5,
    FORMAT_L2L,
    FORMAT_METAOPTNET,
    FORMAT_RAVI,
)
from .listing import FileStat, SourceListing

# ----------------------------------------------------------------------------- detection


def _check_root(data_root: Optional[str], what: str, layouts: str) -> Path:
    """Resolve ``data_root`` or raise a one-line error saying what is missing."""
    hint = f"pass --data-root pointing at a folder with {layouts}"
    if data_root is None or str(data_root).strip() == "":
        raise DataError(f"no {what} data root given; {hint}")
    root = Path(data_root).expanduser().resolve()
    if not root.exists():
        raise DataError(f"{what} data root {root} does not exist; {hint}")
    if not root.is_dir():
        raise DataError(f"{what} data root {root} is not a directory; {hint}")
    return root


def _present_formats(root: Path) -> Dict[str, str]:
    """Formats whose marker files are in ``root``: ``{format: what was found}``."""
    found: Dict[str, str] = {}
    csvs = [f"{s}.csv" for s in SPLITS if (root / f"{s}.csv").is_file()]
    if (root / "images").is_dir() and csvs:
        found[FORMAT_RAVI] = "images/ + " + ", ".join(csvs)
    pkls = sorted(p.name for p in root.glob("mini-imagenet-cache-*.pkl"))
    if pkls:
        found[FORMAT_L2L] = ", ".join(pkls)
    pickles = sorted(p.name for p in root.glob("miniImageNet_category_split_*.pickle"))
    if pickles:
        found[FORMAT_METAOPTNET] = ", ".join(pickles)
    h5 = [f"{s}_data.hdf5" for s in SPLITS if (root / f"{s}_data.hdf5").is_file()]
    if h5:
        found[FORMAT_HDF5] = ", ".join(h5)
    dirs = [f"{s}/" for s in SPLITS if (root / s).is_dir()]
    if dirs:
        found[FORMAT_FOLDERS] = ", ".join(dirs)
    return found


def detect_format(root: Path, allowed: Sequence[str] = ALL_FORMATS, what: str = "Mini-ImageNet") -> str:
    """Return the one format present in ``root``.

    Raises:
        DataError: no known layout (listing the folder's contents, or a sub-folder that
            has one), several layouts, or a layout not in ``allowed``.
    """
    found = _present_formats(root)
    help_text = _LAYOUT_HELP if tuple(allowed) == ALL_FORMATS else _CUSTOM_HELP
    if not found:
        entries = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
        if not entries:
            raise DataError(f"{what} data root {root} is an empty directory; put {help_text} there")
        for sub in entries:
            if (root / sub).is_dir() and _present_formats(root / sub):
                raise DataError(
                    f"{what} data root {root} holds no dataset but its sub-folder {sub}/ does; "
                    f"pass --data-root {root / sub}"
                )
        shown = ", ".join(entries[:8]) + (f", ... ({len(entries)} entries)" if len(entries) > 8 else "")
        raise DataError(f"no known {what} layout in {root} (found: {shown}); expected {help_text}")
    if len(found) > 1:
        listing = "; ".join(f"{fmt}: {desc}" for fmt, desc in found.items())
        raise DataError(
            f"{root} holds several dataset layouts ({listing}); move all but one elsewhere "
            f"or point --data-root at a folder with only one"
        )
    fmt = next(iter(found))
    if fmt not in allowed:
        raise DataError(
            f"{root} holds a {fmt} layout ({found[fmt]}), which the {what} loader does not read; "
            f"expected {help_text} (use --dataset miniimagenet for Mini-ImageNet files)"
        )
    return fmt


def _require(path: Path, kind: str, fmt: str) -> Path:
    ok = path.is_dir() if kind == "dir" else path.is_file()
    if not ok:
        if kind == "file" and (path.exists() or path.is_symlink()):
            check_regular_file(path, f"{fmt} file", DataError)  # a FIFO, socket, device or symlink loop
        raise DataError(f"{fmt} source is missing {path}; add it (or re-download the dataset)")
    return path


def locate_split_files(root: Path, fmt: str, required: Sequence[str]) -> Dict[str, Tuple[Path, ...]]:
    """The files (or folders) holding each split, ``{split: (path, ...)}``.

    Splits in ``required`` must be present; others are included when present.

    Raises:
        DataError: a required file is missing, or two spellings of one file exist.
    """
    out: Dict[str, Tuple[Path, ...]] = {}
    for s in SPLITS:
        need = s in required
        if fmt == FORMAT_RAVI:
            p = root / f"{s}.csv"
            if need or p.exists():
                out[s] = (_require(p, "file", fmt),)
        elif fmt == FORMAT_FOLDERS:
            p = root / s
            if need or p.exists():
                out[s] = (_require(p, "dir", fmt),)
        elif fmt == FORMAT_L2L:
            hits = [root / n for n in _L2L_FILES[s] if (root / n).is_file()]
            if len(hits) > 1:
                raise DataError(f"both {hits[0]} and {hits[1]} exist; keep only one of them")
            if hits:
                out[s] = (hits[0],)
            elif need:
                _require(root / _L2L_FILES[s][0], "file", fmt)
        elif fmt == FORMAT_METAOPTNET:
            p = root / _METAOPTNET_FILES[s]
            if need or p.exists():
                out[s] = (_require(p, "file", fmt),)
        elif fmt == FORMAT_HDF5:
            data, labels = root / f"{s}_data.hdf5", root / f"{s}_labels.json"
            if need or data.exists() or labels.exists():
                out[s] = (_require(data, "file", fmt), _require(labels, "file", fmt))
        else:  # pragma: no cover - formats are a closed set
            raise ValueError(fmt)
    return out


def source_files(listing: SourceListing) -> List[FileStat]:
    """``(relative name, size, mtime_ns, ctime_ns, inode)`` of every file in ``listing`` (the files
    the readers open, :attr:`SourceListing.files`), sorted by name."""
    return listing.stats()


def cache_key(listing: SourceListing, image_size: int, options: dict) -> str:
    """sha256 (16 hex chars) of the root, format, image size, options and the stats of the listed files.

    Args:
        listing: the source's listing, the one its store is then decoded from.
        image_size: side of the stored images.
        options: anything else that changes the store (dataset kind, split checks).
    """
    h = hashlib.sha256()
    h.update(json.dumps([_CACHE_VERSION, str(listing.root), listing.fmt, image_size, options], sort_keys=True).encode())
    for name, size, mtime, ctime, inode in source_files(listing):
        h.update(f"{name}\0{size}\0{mtime}\0{ctime}\0{inode}\n".encode())
    return h.hexdigest()[:16]
