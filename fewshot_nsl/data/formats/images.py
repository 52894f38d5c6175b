"""Image decoding and resizing, array checks, and the parallel decode of a source into one array."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from ...errors import DataError
from .common import _DECODE_CHUNK, _PROGRESS_MIN, ClassSource, _one_line

# ----------------------------------------------------------------------------- images


def _resize_pil(img: Image.Image, size: int) -> Image.Image:
    """Resize to ``size`` x ``size`` (bicubic, antialiased) unless already that size."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return img


def decode_image(path: Path, size: int) -> np.ndarray:
    """Decode one image file to RGB ``uint8`` ``(size, size, 3)``.

    Uses ``Image.draft`` so large JPEGs are downscaled while decoding; greyscale, palette,
    CMYK and RGBA images are converted to RGB; other sizes are resized (bicubic).

    Raises:
        DataError: the file is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))
            rgb = _resize_pil(img.convert("RGB"), size)
            return np.asarray(rgb, dtype=np.uint8)
    except Exception as exc:  # OSError (truncated, unidentified), SyntaxError, DecompressionBombError
        raise DataError(
            f"image {path} is unreadable or truncated ({_one_line(exc)}); re-download or replace it"
        ) from None


def _resize_array(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize ``uint8`` ``(n, h, w, 3)`` to ``(n, size, size, 3)`` (a no-op when already that size)."""
    if arr.shape[1:3] == (size, size):
        return arr
    out = np.empty((len(arr), size, size, 3), dtype=np.uint8)
    for i, a in enumerate(arr):
        out[i] = np.asarray(_resize_pil(Image.fromarray(a), size))
    return out


def _check_image_array(arr: object, path: Path, key: str) -> np.ndarray:
    """Check ``arr`` is ``uint8`` ``(N, H, W, 3)``; return it as an ndarray."""
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        got = f"{arr.dtype} {tuple(arr.shape)}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise DataError(
            f"{path}: '{key}' must be a uint8 array (N, H, W, 3), got {got}; re-download or convert the file"
        )
    return arr


# ----------------------------------------------------------------------------- decoding


def _decode_files(jobs: List[Tuple[Path, int]], out: np.ndarray, workers: Optional[int] = None) -> None:
    """Decode ``jobs`` (``(path, row)``) into ``out[row]`` (``uint8 (N, S, S, 3)``) with a thread pool."""
    if not jobs:
        return
    size = out.shape[1]

    def work(chunk: List[Tuple[Path, int]]) -> int:
        for path, row in chunk:
            out[row] = decode_image(path, size)
        return len(chunk)

    workers = workers or min(16, (os.cpu_count() or 1) + 1)
    chunks = [jobs[i : i + _DECODE_CHUNK] for i in range(0, len(jobs), _DECODE_CHUNK)]
    bar = tqdm(total=len(jobs), desc="decoding images", unit="img", disable=len(jobs) < _PROGRESS_MIN)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for done in pool.map(work, chunks):
                bar.update(done)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            bar.close()


def materialize(classes: List[ClassSource], image_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Decode the classes, in the given order, into one array.

    Args:
        classes: ordered classes.
        image_size: output side ``S``.

    Returns:
        images ``uint8 (N, S, S, 3)`` and labels ``int64 (N,)`` (class position in ``classes``).
    """
    total = sum(c.count for c in classes)
    images = np.empty((total, image_size, image_size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [c.count for c in classes])
    jobs: List[Tuple[Path, int]] = []
    offset = 0
    array_classes = [c for c in classes if c.read is not None]
    bar = tqdm(
        total=len(array_classes), desc="copying classes", unit="class",
        disable=total < _PROGRESS_MIN or not array_classes,
    )
    for c in classes:
        if c.paths is not None:
            jobs += [(p, offset + r) for r, p in enumerate(c.paths)]
        else:
            assert c.read is not None
            arr = c.read()
            if arr.shape[0] != c.count:
                raise DataError(f"{c.origin}: class {c.name} changed size while reading; re-download the file")
            images[offset : offset + c.count] = _resize_array(arr, image_size)
            c.read = None  # drop the reference so the source array can be freed
            bar.update()
        offset += c.count
    bar.close()
    _decode_files(jobs, images)
    return images, labels
