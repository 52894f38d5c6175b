"""Ravi & Larochelle: ``images/`` + ``train.csv``/``val.csv``/``test.csv`` (``filename,label``)."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Dict, List, Tuple

from ...errors import DataError
from ...safe_io import check_regular_file
from .common import ClassSource, _is_file, _sniff

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
    base = str(images_dir)
    real_base = os.path.realpath(images_dir)
    entries = {e.name: e for e in os.scandir(images_dir)}  # file types from the listing: no stat per row
    seen: Dict[str, Tuple[Path, int]] = {}  # keyed by the normalised path inside images/
    seen_real: Dict[str, str] = {}  # resolved path -> the first name listing it
    classes: List[ClassSource] = []
    for split, (csv_path,) in layout.items():
        per_class: Dict[str, List[Path]] = {}
        missing: List[str] = []
        for lineno, fname, label in _read_csv_rows(csv_path):
            if os.path.isabs(fname) or ".." in fname.split(os.sep) or fname.startswith("~"):
                raise DataError(
                    f"{csv_path} line {lineno} names {fname}, outside {images_dir}; list image paths relative to "
                    f"images/ (no absolute paths, no '..')"
                )
            fname = os.path.normpath(fname).replace(os.sep, "/")  # 'a.jpg', './a.jpg', 'b/../a.jpg': one file
            entry = entries.get(fname)
            # two names linked to one file are one file (a plain entry of images/ is not a link)
            if entry is not None and not entry.is_symlink():
                real = os.path.join(real_base, fname)
            else:
                real = os.path.realpath(os.path.join(base, fname))
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
            path = Path(os.path.join(base, fname))
            if entry is None and not ("/" in fname and path.is_file()):
                if path.exists() or path.is_symlink():
                    check_regular_file(path, "image", DataError)  # a FIFO, device, socket or symlink loop
                missing.append(fname)
            elif entry is not None and not _is_file(entry):
                check_regular_file(path, "image", DataError)  # names the FIFO, folder, loop or broken link
            per_class.setdefault(label, []).append(path)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(
                f"{csv_path} names image {missing[0]}{more}, missing from {images_dir}; "
                f"re-download the images or fix the CSV"
            )
        classes += [ClassSource(c, split, csv_path, len(p), paths=p) for c, p in per_class.items()]
    return classes
