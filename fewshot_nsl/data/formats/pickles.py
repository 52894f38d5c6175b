"""learn2learn (``mini-imagenet-cache-*.pkl``) and MetaOptNet (``miniImageNet_category_split_*.pickle``) pickles."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from ...errors import DataError
from .common import ClassSource
from .images import _check_image_array
from .safe_pickle import _text_keys, read_pickle


def _index_list(value: object, path: Path, wnid: str, n: int) -> np.ndarray:
    """``class_dict`` entry as ``int64`` indices, checked against ``0..n-1``."""
    try:
        idx = np.asarray(value, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{path}: class_dict[{wnid}] is not a list of image indices; re-download the file") from None
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        bad = int(idx.max()) if idx.max() >= n else int(idx.min())
        raise DataError(
            f"{path}: class_dict[{wnid}] has image index {bad}, out of range 0..{n - 1}; re-download the file"
        )
    return idx


def scan_learn2learn(layout: Dict[str, Tuple[Path, ...]]) -> List[ClassSource]:
    """Classes of ``mini-imagenet-cache-*.pkl`` files (rank = order of the index list)."""
    classes: List[ClassSource] = []
    for split, (path,) in layout.items():
        obj = _text_keys(read_pickle(path), path, "image_data, class_dict")
        for key in ("image_data", "class_dict"):
            if key not in obj:
                raise DataError(f"{path} has no '{key}' entry (keys: {sorted(map(str, obj))}); re-download it")
        images = _check_image_array(obj["image_data"], path, "image_data")
        class_dict = _text_keys(obj["class_dict"], path, "class_dict")
        owner: Dict[int, str] = {}
        for wnid, value in class_dict.items():
            idx = _index_list(value, path, wnid, len(images))
            if len(idx) == 0:
                raise DataError(f"{path}: class {wnid} has no images; re-download the file")
            for i in idx.tolist():
                if i in owner:
                    raise DataError(f"{path}: image {i} is listed under both {owner[i]} and {wnid}; re-download the file")
                owner[i] = wnid
            classes.append(ClassSource(wnid, split, path, len(idx), read=lambda a=images, i=idx: a[i]))
    return classes


def scan_metaoptnet(layout: Dict[str, Tuple[Path, ...]]) -> List[ClassSource]:
    """Classes of ``miniImageNet_category_split_*.pickle`` files (rank = order of appearance)."""
    classes: List[ClassSource] = []
    for split, (path,) in layout.items():
        obj = _text_keys(read_pickle(path), path, "data, labels, catname2label")
        for key in ("data", "labels", "catname2label"):
            if key not in obj:
                raise DataError(f"{path} has no '{key}' entry (keys: {sorted(map(str, obj))}); re-download it")
        data = _check_image_array(obj["data"], path, "data")
        try:
            labels = np.asarray(obj["labels"], dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            raise DataError(f"{path}: 'labels' is not a list of integers; re-download the file") from None
        if len(labels) != len(data):
            raise DataError(f"{path}: {len(data)} images but {len(labels)} labels; re-download the file")
        name_of = {int(v): k for k, v in _text_keys(obj["catname2label"], path, "catname2label").items()}
        if len(name_of) != len(obj["catname2label"]):
            raise DataError(f"{path}: catname2label maps two classes to one label; re-download the file")
        unknown = sorted(set(np.unique(labels).tolist()) - set(name_of))
        if unknown:
            raise DataError(
                f"{path}: label {unknown[0]} is out of range (catname2label has labels "
                f"{min(name_of)}..{max(name_of)}); re-download the file"
            )
        for label in sorted(name_of):
            idx = np.flatnonzero(labels == label)
            if len(idx) == 0:
                raise DataError(f"{path}: class {name_of[label]} (label {label}) has no images; re-download the file")
            classes.append(ClassSource(name_of[label], split, path, len(idx), read=lambda a=data, i=idx: a[i]))
    return classes
