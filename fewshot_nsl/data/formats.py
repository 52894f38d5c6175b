"""Mini-ImageNet (every common on-disk format) and custom dataset loaders.

Each loader turns a folder on disk into one canonical :class:`~.store.ImageStore`
(``uint8`` images ``(N, S, S, 3)`` grouped by class, ``int64`` labels, class names,
class splits). Formats are detected by the files present:

* ``ravi-csv``: Ravi & Larochelle, ``images/*.jpg`` + ``train.csv``/``val.csv``/``test.csv``
  (header ``filename,label``); rank within a class = CSV row order.
* ``learn2learn-pickle``: ``mini-imagenet-cache-{train,validation|val,test}.pkl`` holding
  ``image_data`` ``(N, 84, 84, 3)`` and ``class_dict`` ``{wnid: [indices]}`` (str or bytes keys);
  rank = order of the index list.
* ``metaoptnet-pickle``: ``miniImageNet_category_split_{train_phase_train,val,test}.pickle``
  holding ``data``, ``labels`` (ints, not starting at 0 for val/test) and ``catname2label``;
  Python-2 pickles are read with ``encoding='latin1'``; rank = order of appearance.
* ``torchmeta-hdf5``: ``{split}_data.hdf5`` (group ``datasets``, one ``(n, 84, 84, 3)`` dataset
  per wnid) + ``{split}_labels.json``; rank = row order.
* ``class-folders``: ``{train,val,test}/<class>/*.jpg|*.png``; rank = sorted file name.

Pickles are read with :class:`SafeUnpickler`, which only admits numpy array reconstruction.
For Mini-ImageNet, splits come from the canonical Ravi wnid lists shipped with the package
(``miniimagenet_split.json``), never from folder membership alone, and the 64/16/20 classes
of 600 images are checked. The decoded store is cached (memory-mapped) under
``cache_dir/<dataset>-<key>``, where the key hashes the resolved root, the format, the image
size, the options and the name, size and mtime of every source file.

Every problem with a source is raised as a one-line :class:`~..errors.DataError` naming
the file and the fix.
"""
from __future__ import annotations

import csv
import stat
import hashlib
import importlib
import io
import json
import os
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import ConfigError, DataError
from ..safe_io import check_regular_file
from ..registry import register_dataset
from .store import SPLITS, ImageStore, default_cache_dir

# ----------------------------------------------------------------------------- constants

PACKAGE_DATA = Path(__file__).resolve().parent
#: Canonical Ravi & Larochelle class split (copied from ``../shared/data``).
SPLIT_FILE = PACKAGE_DATA / "miniimagenet_split.json"
#: Canonical Ravi & Larochelle CSVs (``train.csv``, ``val.csv``, ``test.csv``; MIT licence).
RAVI_CSV_DIR = PACKAGE_DATA / "miniimagenet_ravi"
_SHARED_SPLIT_FILE = Path(__file__).resolve().parents[3] / "shared" / "data" / "miniimagenet_ravi_split.json"

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
#: Bump when the decoding changes, so that old caches are not reused.
_CACHE_VERSION = 1
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


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """``"Type: message"`` squeezed onto one line."""
    text = " ".join(str(exc).split()) or "no detail"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


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


# ----------------------------------------------------------------------------- safe pickles


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that only builds numpy arrays, dtypes and scalars.

    Mini-ImageNet pickles contain dicts, lists, str/bytes, ints and numpy arrays. Dicts,
    lists and scalars are pickle opcodes; only numpy reconstruction needs ``find_class``.
    Anything else (``os.system``, ``builtins.eval``, ...) is refused with a
    :class:`DataError` naming the file, before it can run.

    Args:
        file: binary file object.
        path: the file's path, for messages.
    """

    #: ``(module, name)`` pairs that may be loaded; ``numpy.core`` and ``numpy._core``
    #: spellings are both accepted and resolved to whichever the installed numpy has.
    ALLOWED = frozenset(
        {
            ("numpy._core.multiarray", "_reconstruct"),  # ndarray, protocols 0-4
            ("numpy._core.multiarray", "scalar"),  # numpy scalars
            ("numpy._core.numeric", "_frombuffer"),  # ndarray, protocol 5
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
        }
    )

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        canonical = "numpy._core" + module[len("numpy.core"):] if module.startswith("numpy.core") else module
        if (canonical, name) not in self.ALLOWED:
            raise DataError(
                f"{self.path} asks to load {module}.{name}, which no Mini-ImageNet pickle contains; "
                f"refusing to unpickle it (the file may be malicious), re-download it from a trusted source"
            )
        for candidate in (canonical, canonical.replace("numpy._core", "numpy.core", 1)):
            try:
                return getattr(importlib.import_module(candidate), name)
            except (ImportError, AttributeError):
                continue
        raise DataError(f"{self.path} needs {module}.{name}, which this numpy lacks; upgrade numpy")


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


def read_pickle(path: Path) -> object:
    """Unpickle ``path`` with :class:`SafeUnpickler` (``encoding='latin1'`` for Python-2 pickles).

    Raises:
        DataError: HTML page, empty, truncated or corrupt file, or a forbidden global.
    """
    _sniff(path, "pickle")
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f, path).load()
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"not enough memory to unpickle {path}; free memory or use another format") from None
    except Exception as exc:  # EOFError, UnpicklingError, ValueError from numpy, ...
        raise DataError(
            f"{path} is truncated or not a valid pickle ({_one_line(exc)}); re-download it"
        ) from None


def _text_keys(obj: object, path: Path, what: str) -> dict:
    """Return ``obj`` (a dict) with bytes keys decoded to str."""
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, expected a dict ({what}); re-download it")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


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


def _walk_files(folder: Path) -> Iterable[os.DirEntry]:
    """Every regular file under ``folder`` (recursively, hidden entries skipped).

    Raises:
        DataError: a symlink loop (a folder that leads back to one of its parents, or a link to
            itself), or a FIFO, socket or device in the tree (never opened: that would hang).
    """
    seen = set()
    st = os.stat(folder)
    seen.add((st.st_dev, st.st_ino))
    stack = [(folder, (st.st_dev, st.st_ino))]
    while stack:
        current, _ = stack.pop()
        with os.scandir(current) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                try:
                    est = entry.stat()  # follows symlinks
                except OSError:
                    check_regular_file(Path(entry.path), "dataset file", DataError)  # names the loop / broken link
                    raise
                if stat.S_ISDIR(est.st_mode):
                    key = (est.st_dev, est.st_ino)
                    if key in seen:
                        raise DataError(f"{entry.path} is a symlink loop (it leads back to a folder already read); "
                                        f"remove the link")
                    seen.add(key)
                    stack.append((Path(entry.path), key))
                elif stat.S_ISREG(est.st_mode):
                    yield entry
                else:
                    check_regular_file(Path(entry.path), "dataset file", DataError)


def source_files(root: Path, fmt: str, layout: Dict[str, Tuple[Path, ...]]) -> List[Tuple[str, int, int]]:
    """``(relative name, size, mtime_ns)`` of every file the source is read from, sorted."""
    rows: List[Tuple[str, int, int]] = []

    def add(entry_path: str, st: os.stat_result) -> None:
        # size, mtime and ctime: a rewrite changes ctime even when size and mtime are restored
        rows.append((os.path.relpath(entry_path, root), st.st_size, st.st_mtime_ns * 1_000_000_007 + st.st_ctime_ns))

    for paths in layout.values():
        for p in paths:
            if p.is_dir():
                for e in _walk_files(p):
                    add(e.path, e.stat())
            else:
                check_regular_file(p, "dataset file", DataError)
                add(str(p), p.stat())
    if fmt == FORMAT_RAVI:
        for e in _walk_files(root / "images"):
            add(e.path, e.stat())
    return sorted(rows)


def cache_key(root: Path, fmt: str, image_size: int, files: List[Tuple[str, int, int]], options: dict) -> str:
    """sha256 (16 hex chars) of the root, format, image size, options and file stats."""
    h = hashlib.sha256()
    h.update(json.dumps([_CACHE_VERSION, str(root), fmt, image_size, options], sort_keys=True).encode())
    for name, size, mtime in files:
        h.update(f"{name}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- readers


def _read_csv_rows(path: Path) -> List[Tuple[int, str, str]]:
    """Rows ``(line number, filename, label)`` of a ``filename,label`` CSV."""
    _sniff(path, "CSV file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            f"save it as UTF-8"
        ) from None
    reader = csv.reader(io.StringIO(text))
    rows: List[Tuple[int, str, str]] = []
    header_seen = False
    for lineno, row in enumerate(reader, start=1):
        fields = [f.strip() for f in row]
        if not any(fields):
            continue
        if not header_seen:
            header_seen = True
            if [f.lower() for f in fields] != ["filename", "label"]:
                raise DataError(
                    f"{path} line {lineno}: header must be 'filename,label', got {','.join(fields)!r}; fix the CSV"
                )
            continue
        if len(fields) != 2 or not fields[0] or not fields[1]:
            raise DataError(f"{path} line {lineno}: expected 'filename,label', got {','.join(row)!r}; fix the CSV")
        rows.append((lineno, fields[0], fields[1]))
    if not rows:
        raise DataError(f"{path} lists no images; re-download it or add 'filename,label' rows")
    return rows


def scan_ravi(root: Path, layout: Dict[str, Tuple[Path, ...]]) -> List[ClassSource]:
    """Classes of an ``images/`` + CSV source (one entry per class and CSV, rank = row order).

    Raises:
        DataError: unreadable/non-UTF-8 CSV, bad rows, a file listed twice, or a missing image.
    """
    images_dir = root / "images"
    present = {e.name for e in os.scandir(images_dir)}
    seen: Dict[str, Tuple[Path, int]] = {}  # keyed by the normalised path inside images/
    seen_real: Dict[str, str] = {}  # resolved path -> the first name listing it
    classes: List[ClassSource] = []
    for split, (csv_path,) in layout.items():
        per_class: Dict[str, List[Path]] = {}
        missing: List[str] = []
        for lineno, fname, label in _read_csv_rows(csv_path):
            if os.path.isabs(fname) or ".." in Path(fname).parts or fname.startswith("~"):
                raise DataError(
                    f"{csv_path} line {lineno} names {fname}, outside {images_dir}; list image paths relative to "
                    f"images/ (no absolute paths, no '..')"
                )
            fname = os.path.normpath(fname).replace(os.sep, "/")  # 'a.jpg', './a.jpg', 'b/../a.jpg': one file
            real = os.path.realpath(images_dir / fname)  # and two names linked to one file
            if real in seen_real and seen_real[real] != fname:
                other, other_line = seen[seen_real[real]]
                raise DataError(
                    f"{csv_path} line {lineno} lists {fname}, the same file as {seen_real[real]} ({other} line "
                    f"{other_line}) through a link; remove the duplicate row"
                )
            seen_real.setdefault(real, fname)
            if fname in seen:
                other, other_line = seen[fname]
                raise DataError(
                    f"{csv_path} line {lineno} lists {fname}, already listed in {other} line {other_line}; "
                    f"remove the duplicate row"
                )
            seen[fname] = (csv_path, lineno)
            path = images_dir / fname
            if fname not in present and not (("/" in fname) and path.is_file()):
                if path.exists() or path.is_symlink():
                    check_regular_file(path, "image", DataError)  # a FIFO, device, socket or symlink loop
                missing.append(fname)
            elif not path.is_file():
                check_regular_file(path, "image", DataError)
            per_class.setdefault(label, []).append(images_dir / fname)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(
                f"{csv_path} names image {missing[0]}{more}, missing from {images_dir}; "
                f"re-download the images or fix the CSV"
            )
        classes += [ClassSource(c, split, csv_path, len(p), paths=p) for c, p in per_class.items()]
    return classes


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


def scan_source(root: Path, fmt: str, layout: Dict[str, Tuple[Path, ...]]) -> List[ClassSource]:
    """Dispatch to the reader of ``fmt``; returns one :class:`ClassSource` per class."""
    if fmt == FORMAT_RAVI:
        return scan_ravi(root, layout)
    if fmt == FORMAT_FOLDERS:
        return scan_folders(layout)
    if fmt == FORMAT_L2L:
        return scan_learn2learn(layout)
    if fmt == FORMAT_METAOPTNET:
        return scan_metaoptnet(layout)
    if fmt == FORMAT_HDF5:
        return scan_hdf5(layout)
    raise ValueError(fmt)  # pragma: no cover


# ----------------------------------------------------------------------------- checks and order


def check_unique_classes(classes: List[ClassSource]) -> None:
    """Every class in exactly one split (and listed once)."""
    first: Dict[str, ClassSource] = {}
    for c in classes:
        if c.name in first:
            other = first[c.name]
            where = "twice in the" if other.split == c.split else f"in both the {other.split} and the"
            raise DataError(
                f"class {c.name} is {where} {c.split} split ({other.origin} and {c.origin}); "
                f"keep it in exactly one split"
            )
        first[c.name] = c


def check_canonical(
    classes: List[ClassSource],
    canonical: Dict[str, List[str]],
    expected_per_class: Optional[int],
    root: Optional[Path] = None,
) -> None:
    """Check the classes are exactly the canonical Ravi classes, in their splits, of the expected size.

    Args:
        classes: classes found in the source.
        canonical: ``{split: [wnid, ...]}``.
        expected_per_class: images per class, or None to skip that check.
        root: the data root, for messages.

    Raises:
        DataError: an unknown wnid, a class in the wrong split, a missing class, or a wrong count.
    """
    home = {w: s for s in SPLITS for w in canonical[s]}
    fix = ("fix the source, or accept its splits explicitly with allow_noncanonical_split=True "
           "(--config FILE with 'dataset_options: {allow_noncanonical_split: true}'), or use --dataset custom")
    for c in classes:
        if c.name not in home:
            raise DataError(f"class {c.name} in {c.origin} is not a Mini-ImageNet class of the Ravi split; {fix}")
        if home[c.name] != c.split:
            raise DataError(
                f"class {c.name} is in the {c.split} split in {c.origin} but in {home[c.name]} in the "
                f"canonical Ravi split; {fix}"
            )
    present = {c.name for c in classes}
    for s in SPLITS:
        missing = [w for w in canonical[s] if w not in present]
        if missing:
            have = len(canonical[s]) - len(missing)
            where = f" in {root}" if root else ""
            more = " and more" if len(missing) > 1 else ""
            raise DataError(
                f"the {s} split{where} has {have} of its {len(canonical[s])} Mini-ImageNet classes "
                f"(missing {missing[0]}{more}); the source is incomplete: re-download it, or {fix.split(', or ', 1)[1]}"
            )
    if expected_per_class is not None:
        for c in classes:
            if c.count != expected_per_class:
                raise DataError(
                    f"class {c.name} in {c.origin} has {c.count} images, expected {expected_per_class}; "
                    f"the source is incomplete, re-download it"
                )


def order_classes(
    classes: List[ClassSource], canonical: Optional[Dict[str, List[str]]] = None
) -> List[ClassSource]:
    """Canonical class order: train, then val, then test; within a split, the canonical list
    order for known wnids, then the source order."""
    position = {w: i for s in SPLITS for i, w in enumerate(canonical[s])} if canonical else {}
    indexed = list(enumerate(classes))
    indexed.sort(key=lambda ic: (SPLITS.index(ic[1].split), position.get(ic[1].name, len(position)), ic[0]))
    return [c for _, c in indexed]


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


# ----------------------------------------------------------------------------- builder


def build_store(
    data_root: Optional[str],
    *,
    dataset: str = "miniimagenet",
    cache_dir: Optional[str] = None,
    image_size: int = 84,
    allow_noncanonical_split: bool = False,
    expected_per_class: Optional[int] = 600,
    use_cache: bool = True,
) -> ImageStore:
    """Load a Mini-ImageNet (``dataset="miniimagenet"``) or custom (``"custom"``) source.

    Args:
        data_root: folder holding one of the supported layouts.
        dataset: ``"miniimagenet"`` (canonical split checks, all five formats) or ``"custom"``
            (splits from the files, Ravi-style or class folders, val optional).
        cache_dir: where decoded stores are cached; default ``default_cache_dir() / "stores"``.
        image_size: side ``S`` of the stored images ``(N, S, S, 3)``.
        allow_noncanonical_split: Mini-ImageNet only: keep the splits the source implies and
            skip the class and count checks.
        expected_per_class: Mini-ImageNet only: images per class (``None`` skips the check).
        use_cache: read and write the cache.

    Returns:
        The store (memory-mapped from the cache when it was written).

    Raises:
        DataError: one line naming the bad file and the fix.
    """
    if dataset not in ("miniimagenet", "custom"):
        raise ConfigError(f"unknown dataset kind '{dataset}'; use miniimagenet or custom")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ConfigError(f"image_size must be an integer >= 8, got {image_size!r}")
    mini = dataset == "miniimagenet"
    what = "Mini-ImageNet" if mini else "custom dataset"
    root = _check_root(data_root, what, _LAYOUT_HELP if mini else _CUSTOM_HELP)
    fmt = detect_format(root, ALL_FORMATS if mini else CUSTOM_FORMATS, what)
    layout = locate_split_files(root, fmt, SPLITS if mini else ("train", "test"))

    options = {"dataset": dataset}
    if mini:
        options.update(noncanonical=bool(allow_noncanonical_split), per_class=expected_per_class)
    key = cache_key(root, fmt, image_size, source_files(root, fmt, layout), options)
    store_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "stores"
    store_dir = store_dir / f"{dataset}-{key}"
    if use_cache and ImageStore.is_cached(store_dir):
        try:
            return ImageStore.load(store_dir)
        except Exception as exc:  # a damaged cache is rebuilt, not fatal
            warnings.warn(f"ignoring damaged cache {store_dir} ({_one_line(exc)}); rebuilding it")

    classes = scan_source(root, fmt, layout)
    check_unique_classes(classes)
    canonical = canonical_split() if mini else None
    if mini and not allow_noncanonical_split:
        assert canonical is not None
        check_canonical(classes, canonical, expected_per_class, root)
    classes = order_classes(classes, canonical)
    images, labels = materialize(classes, image_size)
    store = ImageStore(
        dataset,
        images,
        labels,
        [c.name for c in classes],
        [c.split for c in classes],
        synthetic=False,
        source=f"{fmt} at {root}",
    )
    if not use_cache:
        return store
    try:
        store.save(store_dir)
    except OSError as exc:
        warnings.warn(
            f"could not cache {dataset} in {store_dir} ({_one_line(exc)}); it will be decoded again next time"
        )
        return store
    return ImageStore.load(store_dir)


@register_dataset("miniimagenet")
def load_miniimagenet(
    data_root: Optional[str] = None,
    cache_dir: Optional[str] = None,
    image_size: int = 84,
    allow_noncanonical_split: bool = False,
) -> ImageStore:
    """Mini-ImageNet (Ravi & Larochelle split) from any supported on-disk format.

    Args:
        data_root: folder with ``images/`` + ``train.csv``/``val.csv``/``test.csv``,
            ``mini-imagenet-cache-*.pkl``, ``miniImageNet_category_split_*.pickle``,
            ``{split}_data.hdf5`` + ``{split}_labels.json`` or ``{train,val,test}/<wnid>/``.
        cache_dir: cache folder; default ``default_cache_dir() / "stores"``.
        image_size: side ``S`` of the stored images ``(N, S, S, 3)``.
        allow_noncanonical_split: keep the splits the source implies and skip the
            64/16/20-classes and 600-images checks (every class must still be in one split).

    Returns:
        Store named ``"miniimagenet"``: classes are the train wnids (split-file order), then
        val, then test; ``N = 60000`` for the canonical source.
    """
    return build_store(
        data_root,
        dataset="miniimagenet",
        cache_dir=cache_dir,
        image_size=image_size,
        allow_noncanonical_split=allow_noncanonical_split,
        expected_per_class=EXPECTED_PER_CLASS,
    )


@register_dataset("custom")
def load_custom(
    data_root: Optional[str] = None, cache_dir: Optional[str] = None, image_size: int = 84
) -> ImageStore:
    """The user's own dataset: ``images/`` + ``train.csv``/``test.csv`` (``val.csv`` optional,
    any class names in the ``label`` column) or ``train/<class>/``, ``test/<class>/``
    (``val/`` optional) folders of ``.jpg``/``.png`` images.

    Args:
        data_root: the folder.
        cache_dir: cache folder; default ``default_cache_dir() / "stores"``.
        image_size: side ``S`` of the stored images ``(N, S, S, 3)``.

    Returns:
        Store named ``"custom"``; splits as in the files, classes ordered train, val, test
        (within a split, in the order of the source).
    """
    return build_store(data_root, dataset="custom", cache_dir=cache_dir, image_size=image_size)


__all__ = [
    "SafeUnpickler",
    "build_store",
    "canonical_split",
    "decode_image",
    "detect_format",
    "load_custom",
    "load_miniimagenet",
    "read_pickle",
]
