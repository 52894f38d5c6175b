"""Class folders: ``{train,val,test}/<class>/*.jpg|png``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Tuple

from ...errors import DataError
from ...safe_io import check_regular_file
from .common import IMAGE_EXTENSIONS, ClassSource


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
            if e.is_dir():
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
            files = sorted(
                e.name for e in os.scandir(d)
                if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS)
                and (e.is_file() or check_regular_file(Path(e.path), "image", DataError))
            )
            if not files:
                raise DataError(f"class folder {d} has no .jpg/.jpeg/.png images; add images or remove it")
            classes.append(ClassSource(d.name, split, d, len(files), paths=[d / f for f in files]))
    return classes
