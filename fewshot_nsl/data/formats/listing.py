"""The one listing of a source's files, shared by the cache key and the readers.

:func:`list_source` runs the format's file scan once (the Ravi CSVs, the class folders) and keeps
what it found in a :class:`SourceListing`. The cache key (:func:`~.detect.cache_key`) is computed
from :attr:`SourceListing.files`, and the store is decoded from the same object
(:func:`read_classes`), so the key covers exactly the files the loader reads:

* ``ravi-csv``: the CSVs and every image they name (names starting with ``.`` included: the CSV
  names them, so they are read and keyed); other files in ``images/`` are neither.
* ``class-folders``: every ``.jpg``/``.jpeg``/``.png`` in a class folder; names starting with
  ``.`` (``.DS_Store``, ``._x.jpg`` AppleDouble files, ``.ipynb_checkpoints/``) and other files
  are neither read nor keyed.
* pickles and HDF5: the split files (``{split}_labels.json`` beside each HDF5 file); the classes
  inside are read from those files only when the store is decoded (not on a cache hit).
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ...errors import DataError
from ...safe_io import check_regular_file
from .common import FORMAT_FOLDERS, FORMAT_HDF5, FORMAT_L2L, FORMAT_METAOPTNET, FORMAT_RAVI, ClassSource
from .folders import scan_folders
from .hdf5 import scan_hdf5
from .pickles import scan_learn2learn, scan_metaoptnet
from .ravi import scan_ravi

#: ``(name relative to the root, size, mtime_ns, ctime_ns, inode)`` of one listed file.
FileStat = Tuple[str, int, int, int, int]

#: Formats whose classes are lists of image files found by the scan.
FILE_FORMATS = (FORMAT_RAVI, FORMAT_FOLDERS)


@dataclass(frozen=True)
class SourceListing:
    """Everything a source is read from, found once.

    Attributes:
        root: the resolved data root.
        fmt: the source's format.
        layout: ``{split: (path, ...)}`` from :func:`~.detect.locate_split_files`: the split
            files (CSV, pickle, HDF5 + labels JSON), or the split folders of ``class-folders``.
        classes: file formats: the classes with their image files in rank order, as the
            reader found them; array formats: ``None`` (the classes are inside the split files).
    """

    root: Path
    fmt: str
    layout: Dict[str, Tuple[Path, ...]]
    classes: Optional[Tuple[ClassSource, ...]]

    @cached_property
    def files(self) -> Tuple[Path, ...]:
        """Every file the readers open, sorted: the split files (not the split folders) and the
        image files of the classes."""
        found = set()
        if self.fmt != FORMAT_FOLDERS:
            found.update(p for paths in self.layout.values() for p in paths)
        for c in self.classes or ():
            found.update(c.paths or ())
        return tuple(sorted(found, key=os.fspath))

    def stats(self) -> List[FileStat]:
        """:data:`FileStat` of every listed file, in :attr:`files` order (links followed; sorted by name).

        Raises:
            DataError: a listed file vanished or is not a regular file.
        """
        rows: List[FileStat] = []
        prefix = os.path.join(str(self.root), "")
        for p in self.files:
            name = str(p)
            try:
                st = os.stat(p)
            except OSError:
                check_regular_file(p, "dataset file", DataError)  # names the loop / broken link / missing file
                raise
            if not stat.S_ISREG(st.st_mode):
                check_regular_file(p, "dataset file", DataError)
            # size, mtime, ctime and inode: a rewrite changes ctime even when size and mtime are
            # restored, a file replaced by another one (rename, relinked symlink) changes the inode
            rel = name[len(prefix):] if name.startswith(prefix) else os.path.relpath(name, self.root)
            rows.append((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        return rows


def list_source(root: Path, fmt: str, layout: Dict[str, Tuple[Path, ...]]) -> SourceListing:
    """The listing of a source (the format's file scan, run once).

    Args:
        root: the resolved data root.
        fmt: its format (:func:`~.detect.detect_format`).
        layout: its split files or folders (:func:`~.detect.locate_split_files`).

    Raises:
        DataError: a bad CSV, a missing image, an empty class folder (one line each).
    """
    classes: Optional[List[ClassSource]] = None
    if fmt == FORMAT_RAVI:
        classes = scan_ravi(root, layout)
    elif fmt == FORMAT_FOLDERS:
        classes = scan_folders(layout)
    elif fmt not in (FORMAT_L2L, FORMAT_METAOPTNET, FORMAT_HDF5):  # pragma: no cover - a closed set
        raise ValueError(fmt)
    return SourceListing(root, fmt, dict(layout), None if classes is None else tuple(classes))


def read_classes(listing: SourceListing) -> List[ClassSource]:
    """The classes of a listed source, read from the listed files only.

    File formats: the classes the scan found (their images are decoded later, from
    :attr:`ClassSource.paths`). Array formats: the split files are read now.

    Returns:
        One :class:`ClassSource` per class, in source order (fresh objects: decoding may drop
        their array readers).
    """
    if listing.classes is not None:
        return [ClassSource(c.name, c.split, c.origin, c.count, paths=list(c.paths or ())) for c in listing.classes]
    if listing.fmt == FORMAT_L2L:
        return scan_learn2learn(listing.layout)
    if listing.fmt == FORMAT_METAOPTNET:
        return scan_metaoptnet(listing.layout)
    if listing.fmt == FORMAT_HDF5:
        return scan_hdf5(listing.layout)
    raise ValueError(listing.fmt)  # pragma: no cover
