"""torchmeta HDF5: ``{split}_data.hdf5`` + ``{split}_labels.json``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from ...errors import DataError
from .common import ClassSource, _one_line, _sniff


def _h5_read(path: Path, name: str) -> np.ndarray:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return f["datasets"][name][()]
    except Exception as exc:
        raise DataError(f"{path} is truncated or corrupt ({_one_line(exc)}); re-download it") from None


def scan_hdf5(layout: Dict[str, Tuple[Path, ...]]) -> List[ClassSource]:
    """Classes of torchmeta ``{split}_data.hdf5`` + ``{split}_labels.json`` files (rank = row order)."""
    import h5py

    classes: List[ClassSource] = []
    for split, (path, labels_path) in layout.items():
        _sniff(labels_path, "JSON file")
        try:
            wnids = json.loads(labels_path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise DataError(f"{labels_path} is not valid JSON ({_one_line(exc)}); re-download it") from None
        if not isinstance(wnids, list) or not all(isinstance(w, str) for w in wnids):
            raise DataError(f"{labels_path} must be a JSON list of class names; re-download it")
        _sniff(path, "HDF5 file")
        try:
            with h5py.File(path, "r") as f:
                if "datasets" not in f:
                    raise DataError(f"{path} has no 'datasets' group (keys: {sorted(f)}); re-download it")
                group = f["datasets"]
                stored = set(group.keys())
                shapes = {w: (group[w].shape, group[w].dtype) for w in wnids if w in stored}
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{path} is truncated or not an HDF5 file ({_one_line(exc)}); re-download it") from None
        if set(wnids) != stored:
            extra = sorted(stored - set(wnids)) or sorted(set(wnids) - stored)
            raise DataError(
                f"{labels_path} and {path} list different classes (e.g. {extra[0]}); re-download both files"
            )
        for w in wnids:
            shape, dtype = shapes[w]
            if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
                raise DataError(
                    f"{path}: dataset {w} must be uint8 (N, H, W, 3), got {dtype} {tuple(shape)}; re-download it"
                )
            classes.append(ClassSource(w, split, path, shape[0], read=lambda p=path, n=w: _h5_read(p, n)))
    return classes
