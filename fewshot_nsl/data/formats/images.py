"""Image decoding and resizing, array checks, and the parallel decode of a source into one array."""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from ...errors import DataError
from .common import _DECODE_CHUNK, _PROGRESS_MIN, ClassSource, _one_line

# ----------------------------------------------------------------------------- images


class ImageModeWarning(UserWarning):
    """Said once per decoded source: which image modes were converted to 8-bit RGB, and how."""


def _resize_pil(img: Image.Image, size: int) -> Image.Image:
    """Resize to ``size`` x ``size`` (bicubic, antialiased) unless already that size."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return img


#: Alpha-carrying modes (``La``/``RGBa``: premultiplied) and the white they are composited on.
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_WHITE = (255, 255, 255, 255)
#: Largest value of a 16-bit image; ``65535 / 257 = 255``.
_MAX16 = 65535

#: How each mode that is not already 8-bit RGB is converted (for the console note).
_HOW = {
    "1": "1 (black and white, to 0 and 255)",
    "L": "L (8-bit grey, copied to R, G and B)",
    "P": "P (palette colours)",
    "CMYK": "CMYK (PIL's CMYK to RGB conversion, no colour profile)",
    "I": "I (32-bit integer grey holding 0..65535, read as 16-bit: divided by 257)",
}


def _grey16_to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """A 16-bit (``I;16``, ``I;16B``, ...) or ``I`` grey image scaled to 8 bits (``v / 257``, rounded).

    Raises:
        DataError: values outside ``0..65535`` (a 32-bit or signed image, whose range is not defined).
    """
    arr = np.asarray(img).astype(np.int64)  # (H, W)
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo < 0 or hi > _MAX16:
        raise DataError(
            f"image {path} has integer pixels (mode {img.mode}) with values {lo}..{hi}, outside the unsigned "
            f"16-bit range 0..65535, so their scale is not defined; save the images as 8- or 16-bit PNG"
        )
    grey = ((arr * 2 + 257) // 514).astype(np.uint8)  # round(v / 257)
    clear = img.info.get("transparency")
    if isinstance(clear, int):  # a transparent grey level (PNG tRNS): white, as other transparency
        grey[np.asarray(img) == clear] = 255
    return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))


def _composite_on_white(img: Image.Image) -> Tuple[Image.Image, str]:
    """An image with an alpha channel or a transparent colour, over a white background."""
    mode = img.mode if img.mode in _ALPHA_MODES else f"{img.mode} with a transparent colour"
    rgba = img.convert("RGBA")
    if rgba.getchannel("A").getextrema()[0] == 255:  # nothing is transparent
        return rgba.convert("RGB"), f"{mode} (opaque: alpha dropped)"
    white = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(white, rgba).convert("RGB"), f"{mode} (transparency composited on white)"


def to_rgb(img: Image.Image, path: Path) -> Tuple[Image.Image, str]:
    """The 8-bit RGB version of a decoded image, and how it was converted.

    ``RGB`` is kept; 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, and ``I`` holding
    ``0..65535``) is divided by 257 (not clipped: PIL's ``convert("RGB")`` turns almost every 16-bit
    pixel white); transparency (``RGBA``, ``LA``, ``PA``, ``P``/``L``/``RGB`` with a transparent
    colour) is composited on white; ``1``, ``L``, ``P``, ``CMYK`` and other modes PIL can convert
    go through ``convert("RGB")``.

    Args:
        img: an opened PIL image.
        path: its file, for messages.

    Returns:
        The RGB image, and ``""`` when it was 8-bit RGB already, else what was done (for the note).

    Raises:
        DataError: floating-point pixels (mode ``F``) or 32-bit integers outside 0..65535, whose
            range is not defined, or a mode PIL cannot convert.
    """
    mode = img.mode
    if mode == "I" or mode.startswith("I;16"):
        return _grey16_to_rgb(img, path), _HOW.get(mode, f"{mode} (16-bit grey, divided by 257)")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        return _composite_on_white(img)
    if mode == "RGB":
        return img, ""
    if mode == "F":
        raise DataError(
            f"image {path} has 32-bit floating-point pixels (mode F), whose value range is not defined; "
            f"save the images as 8- or 16-bit PNG"
        )
    try:
        rgb = img.convert("RGB")
    except ValueError:
        raise DataError(
            f"image {path} has mode {mode}, which cannot be converted to RGB; save the images as 8-bit RGB PNG or JPEG"
        ) from None
    return rgb, _HOW.get(mode, f"{mode} (PIL's conversion to RGB)")


def decode_image(path: Path, size: int, converted: Optional[Counter] = None) -> np.ndarray:
    """Decode one image file to RGB ``uint8`` ``(size, size, 3)``.

    Uses ``Image.draft`` so large JPEGs are downscaled while decoding; other modes are converted to
    8-bit RGB by :func:`to_rgb` (16-bit grey scaled, transparency on white); other sizes are
    resized (bicubic).

    Args:
        path: the image file.
        size: output side.
        converted: when given, ``converted[how] += 1`` for an image that was not 8-bit RGB.

    Raises:
        DataError: the file is missing, truncated or not an image, or its pixels have no defined
            8-bit scale (:func:`to_rgb`).
    """
    try:
        with Image.open(path) as img:
            img.draft("RGB", (size, size))
            rgb, how = to_rgb(img, path)
            out = np.asarray(_resize_pil(rgb, size), dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:  # OSError (truncated, unidentified), SyntaxError, DecompressionBombError
        raise DataError(
            f"image {path} is unreadable or truncated ({_one_line(exc)}); re-download or replace it"
        ) from None
    if how and converted is not None:
        converted[how] += 1
    return out


def conversion_note(converted: Counter, total: int) -> str:
    """One line saying which image modes were converted to 8-bit RGB, and how; ``""`` if none.

    Args:
        converted: ``{how: number of images}`` from :func:`decode_image`.
        total: number of images decoded.
    """
    if not converted:
        return ""
    parts = ", ".join(f"{n} image{'s' if n != 1 else ''} {how}" for how, n in sorted(converted.items()))
    return f"converted {sum(converted.values())} of {total} images to 8-bit RGB: {parts}"


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


def _decode_files(
    jobs: List[Tuple[Path, int]], out: np.ndarray, converted: Counter, workers: Optional[int] = None
) -> None:
    """Decode ``jobs`` (``(path, row)``) into ``out[row]`` (``uint8 (N, S, S, 3)``) with a thread pool,
    counting in ``converted`` the images that were not 8-bit RGB (by how they were converted)."""
    if not jobs:
        return
    size = out.shape[1]

    def work(chunk: List[Tuple[Path, int]]) -> Tuple[int, Counter]:
        seen: Counter = Counter()  # one per task: no counter shared between threads
        for path, row in chunk:
            out[row] = decode_image(path, size, seen)
        return len(chunk), seen

    workers = workers or min(16, (os.cpu_count() or 1) + 1)
    chunks = [jobs[i : i + _DECODE_CHUNK] for i in range(0, len(jobs), _DECODE_CHUNK)]
    bar = tqdm(total=len(jobs), desc="decoding images", unit="img", disable=len(jobs) < _PROGRESS_MIN)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for done, seen in pool.map(work, chunks):
                converted.update(seen)
                bar.update(done)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            bar.close()


def materialize(
    classes: List[ClassSource], image_size: int, converted: Optional[Counter] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Decode the classes, in the given order, into one array.

    Args:
        classes: ordered classes.
        image_size: output side ``S``.
        converted: when given, counts the image files that were not 8-bit RGB, by how they were
            converted (:func:`conversion_note` turns it into one line).

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
    _decode_files(jobs, images, converted if converted is not None else Counter())
    return images, labels
