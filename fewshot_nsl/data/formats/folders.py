"""Class folders: ``{train,val,test}/<class>/*.jpg|png``.

Names starting with ``.`` (``.DS_Store``, AppleDouble ``._x.jpg``, ``.ipynb_checkpoints/``) and files
that are not ``.jpg``/``.jpeg``/``.png`` are not part of the dataset: neither read nor in its listing
(:mod:`.listing`); a sub-folder inside a class folder is refused (its images would not be read)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Tuple

from ...errors import DataError
from ...safe_io import check_regular_file
from .common import IMAGE_EXTENSIONS, ClassSource, _is_dir, _is_file


def _nested_folder_error(class_dir: Path, entry: os.DirEntry) -> DataError:
    """The one-line error for a folder inside a class folder (its images would not be read)."""
    path = Path(entry.path)
    if entry.is_symlink():
        target, here = os.path.realpath(path), os.path.realpath(class_dir)
        if here == target or here.startswith(target + os.sep):
            return DataError(f"{path} is a symlink loop (it leads back to {target}, a folder above it); remove the link")
    return DataError(
        f"class folder {class_dir} holds a sub-folder {entry.name}/, whose images would not be read; "
        f"put the images directly in {class_dir} (one folder per class) or move the sub-folder out"
    )


def _class_images(class_dir: Path) -> List[str]:
    """Sorted names of the images of one class folder: the ``.jpg``/``.jpeg``/``.png`` files not
    starting with ``.``; other files (``.DS_Store``, ``Thumbs.db``, notes) are not part of the class.

    Raises:
        DataError: a sub-folder (its images would silently be left out), or an image name that is
            a FIFO, device, folder, broken link or symlink loop.
    """
    names: List[str] = []
    for e in os.scandir(class_dir):
        if e.name.startswith("."):
            continue
        if _is_dir(e):
            raise _nested_folder_error(class_dir, e)
        if e.name.lower().endswith(IMAGE_EXTENSIONS):
            if not _is_file(e):
                check_regular_file(Path(e.path), "image", DataError)  # names the FIFO, loop or broken link
            names.append(e.name)
    return sorted(names)


def scan_folders(layout: Dict[str, Tuple[Path, ...]]) -> List[ClassSource]:
    """Classes of a ``{split}/<class>/*.jpg|png`` source (rank = sorted file name).

    Raises:
        DataError: a split folder without class folders, loose images, or an empty class folder.
    """
    classes: List[ClassSource] = []
    for split, (split_dir,) in layout.items():
        subdirs, loose = [], []
        for e in sorted(os.scandir(split_dir), key=lambda e: e.name):
            if e.name.startswith("."):
                continue
            if _is_dir(e):
                subdirs.append(Path(e.path))
            elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                loose.append(e.name)
        if loose:
            raise DataError(
                f"{split_dir} holds images directly ({loose[0]}, ...); put them in one sub-folder per class"
            )
        if not subdirs:
            raise DataError(f"{split_dir} has no class folders; add one sub-folder of images per class")
        for d in subdirs:
            files = _class_images(d)
            if not files:
                raise DataError(f"class folder {d} has no .jpg/.jpeg/.png images; add images or remove it")
            classes.append(ClassSource(d.name, split, d, len(files), paths=[d / f for f in files]))
    return classes
