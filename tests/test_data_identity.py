"""A dataset's identity is the files its loader reads (issue 25, data half of "identity from what was
used" and "decoding").

* One listing of a source's files feeds both the cache key and the readers: a CSV naming
  dot-named images puts them in the key, so replacing them rebuilds the decoded store.
* Every format's listing is exactly the set of files the loader opens.
* High-bit-depth and other non-RGB images are scaled to 8-bit RGB correctly (``I;16`` divided by
  257, not clipped), transparency is composited on white, undefined ranges are refused in one
  line, and the conversions are said once.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Dict, List

import h5py
import numpy as np
import pytest
from PIL import Image

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from open_audit import opened_under, real, recording_opens  # noqa: E402
from test_formats import (  # noqa: E402
    TINY,
    make_data,
    write_folders,
    write_hdf5,
    write_l2l,
    write_metaoptnet,
    write_ravi,
)

from fewshot_nsl.data import formats  # noqa: E402
from fewshot_nsl.data.formats import (  # noqa: E402
    FORMAT_FOLDERS,
    FORMAT_HDF5,
    FORMAT_L2L,
    FORMAT_METAOPTNET,
    FORMAT_RAVI,
    build_store,
    decode_image,
    load_custom,
)
from fewshot_nsl.errors import DataError  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch the user's cache."""
    monkeypatch.setenv("FEWSHOT_NSL_CACHE", str(tmp_path / "default-cache"))


# ----------------------------------------------------------------------------- helpers


def noise(seed: int, n: int, size: int = 8) -> np.ndarray:
    """``uint8 (n, size, size, 3)`` random images (lossless in PNG)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_custom_ravi(root: Path, classes: Dict[str, Dict[str, List[str]]], seed: int = 0) -> Dict[str, np.ndarray]:
    """``images/`` + ``{split}.csv`` of a custom dataset; ``classes`` = ``{split: {class: [file names]}}``.

    Returns:
        ``{file name: uint8 (8, 8, 3)}`` written as PNG (lossless).
    """
    (root / "images").mkdir(parents=True)
    written: Dict[str, np.ndarray] = {}
    for k, (split, by_class) in enumerate(classes.items()):
        lines = ["filename,label"]
        for c, names in by_class.items():
            imgs = noise(seed + 100 * k + len(written), len(names))
            for name, img in zip(names, imgs):
                Image.fromarray(img).save(root / "images" / name)
                written[name] = img
                lines.append(f"{name},{c}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return written


def dotted_classes() -> Dict[str, Dict[str, List[str]]]:
    """Two train and two test classes, every image named with a leading dot."""
    return {
        split: {f"{split}{c}": [f".{split}{c}_{i}.png" for i in range(3)] for c in range(2)}
        for split in ("train", "test")
    }


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg, msg
    return msg


# ----------------------------------------------------------------------------- one listing


def test_replaced_dot_named_images_rebuild_the_store(tmp_path):
    """The CSV reader reads ``.name.png`` images, so they are part of the cache key: replacing them
    (even with the old mtime restored) gives a new store with the new pixels and a new fingerprint."""
    root = tmp_path / "data"
    written = write_custom_ravi(root, dotted_classes())
    cache = str(tmp_path / "cache")
    first = load_custom(str(root), cache_dir=cache, image_size=8)
    order = [n for s in ("train", "test") for c in dotted_classes()[s].values() for n in c]
    assert np.array_equal(np.asarray(first.images), np.stack([written[n] for n in order]))

    new = {}
    for i, name in enumerate(order):  # replace every image, same size, old mtime put back
        path = root / "images" / name
        st = path.stat()
        new[name] = 255 - written[name]
        Image.fromarray(new[name]).save(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    second = load_custom(str(root), cache_dir=cache, image_size=8)
    assert np.array_equal(np.asarray(second.images), np.stack([new[n] for n in order])), "stale decoded store reused"
    assert second.fingerprint() != first.fingerprint()
    listed = {Path(p).name for p in second.source_files}
    assert set(order) <= listed and {"train.csv", "test.csv"} <= listed


def test_folder_layout_skips_hidden_and_non_image_files_in_both_key_and_loader(tmp_path):
    """Class folders: ``.DS_Store``-style hidden files and non-images are neither read nor keyed, so
    editing them reuses the cache, while editing a listed image rebuilds it."""
    root = tmp_path / "folders"
    imgs = noise(1, 8)
    for k, (split, c) in enumerate([("train", "a"), ("train", "b"), ("test", "c"), ("test", "d")]):
        (root / split / c).mkdir(parents=True)
        for r in range(2):
            Image.fromarray(imgs[2 * k + r]).save(root / split / c / f"{r}.png")
    junk = [root / "train" / "a" / ".DS_Store", root / "train" / "a" / "._0.png", root / "test" / "c" / "notes.txt"]
    for p in junk:
        p.write_bytes(b"not an image")
    cache = str(tmp_path / "cache")
    first = load_custom(str(root), cache_dir=cache, image_size=8)
    assert {real(p) for p in first.source_files} == {real(p) for p in root.glob("*/*/[0-9].png")}
    for p in junk:
        p.write_bytes(b"edited, still not an image")
    assert load_custom(str(root), cache_dir=cache, image_size=8).source_files == first.source_files
    Image.fromarray(255 - imgs[0]).save(root / "train" / "a" / "0.png")
    again = load_custom(str(root), cache_dir=cache, image_size=8)
    assert np.array_equal(np.asarray(again.images[0]), 255 - imgs[0])


def _tiny_sources(base: Path) -> Dict[str, Path]:
    """Every format, a few classes and images each; the Ravi source also names a dot-named image
    and the folder source holds hidden and non-image files the loader must skip."""
    data = make_data(seed=7, per_class=2, size=8, classes=TINY)
    roots = {
        FORMAT_RAVI: write_ravi(base / "ravi", data, ext="png"),
        FORMAT_FOLDERS: write_folders(base / "folders", data),
        FORMAT_L2L: write_l2l(base / "l2l", data),
        FORMAT_METAOPTNET: write_metaoptnet(base / "metaoptnet", data),
        FORMAT_HDF5: write_hdf5(base / "hdf5", data),
    }
    ravi = roots[FORMAT_RAVI]
    first = sorted((ravi / "images").iterdir())[0]
    hidden = first.with_name("." + first.name)
    first.rename(hidden)
    csv = next(p for p in ravi.glob("*.csv") if first.name in p.read_text())
    csv.write_text(csv.read_text().replace(first.name, hidden.name))
    (ravi / "images" / "unlisted.png").write_bytes(first.with_suffix("").name.encode())  # not in any CSV
    folder = next((roots[FORMAT_FOLDERS] / "train").iterdir())
    (folder / ".DS_Store").write_bytes(b"junk")
    (folder / "README.txt").write_bytes(b"junk")
    (roots[FORMAT_FOLDERS] / "train" / ".hidden_class").mkdir()
    Image.fromarray(data["train"][TINY["train"][0]][0]).save(roots[FORMAT_FOLDERS] / "train" / ".hidden_class" / "x.png")
    return roots


@pytest.mark.parametrize("fmt", [FORMAT_RAVI, FORMAT_FOLDERS, FORMAT_L2L, FORMAT_METAOPTNET, FORMAT_HDF5])
def test_every_format_listing_is_exactly_what_the_loader_opens(tmp_path, monkeypatch, fmt):
    root = _tiny_sources(tmp_path)[fmt]
    h5_opened: List[str] = []
    h5_file = h5py.File

    def recording_h5(name, *args, **kwargs):  # HDF5 opens its files in C, unseen by the audit hook
        h5_opened.append(os.fspath(name))
        return h5_file(name, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", recording_h5)
    kwargs = dict(cache_dir=str(tmp_path / "cache"), image_size=8, allow_noncanonical_split=True,
                  expected_per_class=None)
    with recording_opens() as events:
        store = build_store(str(root), **kwargs)
    listed = {real(p) for p in store.source_files}
    assert listed and all(Path(p).is_absolute() for p in store.source_files)
    assert opened_under(root, events + h5_opened) == listed
    # the cached store: whatever is opened to find the key (the CSVs) is in the same listing
    with recording_opens() as events:
        cached = build_store(str(root), **kwargs)
    assert isinstance(cached.images, np.memmap)
    assert {real(p) for p in cached.source_files} == listed
    assert opened_under(root, events + h5_opened) <= listed
    # the listing behind the key is the readers' own: formats.list_source gives the same files
    resolved = Path(root).resolve()
    listing = formats.list_source(resolved, fmt, formats.locate_split_files(resolved, fmt, ()))
    assert {real(p) for p in listing.files} == listed


# ----------------------------------------------------------------------------- decoding


GREY16 = np.array([[0, 1, 128, 129], [257, 514, 1000, 32767], [32896, 65279, 65534, 65535],
                   [100, 200, 40000, 12345]], dtype=np.uint16)
WANT16 = np.repeat(np.round(GREY16 / 257).astype(np.uint8)[..., None], 3, axis=-1)


def test_16bit_png_decodes_to_its_grey_levels(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(GREY16).save(path)
    assert Image.open(path).mode == "I;16"
    got = decode_image(path, 4)
    assert np.array_equal(got, WANT16), got[..., 0]
    big_endian = tmp_path / "g16b.tif"
    Image.fromarray(GREY16.astype(">u2")).save(big_endian)
    assert Image.open(big_endian).mode == "I;16B"
    assert np.array_equal(decode_image(big_endian, 4), WANT16)


def test_16bit_square_image_through_the_loader_and_one_note(tmp_path):
    """An ``I;16`` dataset gives grey levels / 257 in the store, with one note naming the mode."""
    root = tmp_path / "folders"
    rng = np.random.default_rng(3)
    values = {}
    for split, c in [("train", "a"), ("train", "b"), ("test", "c")]:
        (root / split / c).mkdir(parents=True)
        for r in range(2):
            v = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
            Image.fromarray(v).save(root / split / c / f"{r}.png")
            values[(c, r)] = v
    Image.fromarray(noise(4, 1)[0]).save(root / "test" / "c" / "2.png")  # one plain RGB image beside them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = load_custom(str(root), cache_dir=str(tmp_path / "cache"), image_size=8)
    notes = [str(w.message) for w in caught if "I;16" in str(w.message)]
    assert len(notes) == 1 and "6 images" in notes[0] and "257" in notes[0], [str(w.message) for w in caught]
    assert store.decode_note.endswith(notes[0]) and "images resized to 8x8 px" in store.decode_note  # one console note
    want = np.round(values[("a", 1)] / 257).astype(np.uint8)
    assert np.array_equal(np.asarray(store.images[1]), np.repeat(want[..., None], 3, axis=-1))
    assert np.asarray(store.images[:6]).mean() < 200  # not clipped to white
    with warnings.catch_warnings(record=True) as caught:  # the cached store says nothing again
        warnings.simplefilter("always")
        cached = load_custom(str(root), cache_dir=str(tmp_path / "cache"), image_size=8)
    assert not [w for w in caught if "I;16" in str(w.message)] and cached.decode_note == store.decode_note


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def test_other_modes_are_converted_correctly(tmp_path):
    grey = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    alpha = np.array([[255, 0], [128, 255]], dtype=np.uint8)

    # 1: black and white -> 0 / 255
    one = _save(Image.fromarray(grey > 127), tmp_path / "one.png")
    assert Image.open(one).mode == "1"
    assert np.array_equal(decode_image(one, 2), np.repeat(np.where(grey > 127, 255, 0)[..., None], 3, -1))
    # LA: alpha composited on white
    la = _save(Image.fromarray(np.stack([grey, alpha], -1)), tmp_path / "la.png")
    assert Image.open(la).mode == "LA"
    a = alpha / 255.0
    want = np.round(grey * a + 255 * (1 - a))
    assert np.abs(decode_image(la, 2)[..., 0].astype(int) - want).max() <= 1
    # P with a transparent palette entry: that entry is white, not its palette colour
    p = Image.new("P", (2, 2))
    p.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    p.putdata([0, 1, 1, 0])
    p = _save(p, tmp_path / "p.png", transparency=0)
    assert Image.open(p).mode == "P" and "transparency" in Image.open(p).info
    got = decode_image(p, 2)
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == [200, 0, 0]
    # RGBA
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = alpha
    got = decode_image(_save(Image.fromarray(rgba), tmp_path / "rgba.png"), 2)
    assert got[0, 1].tolist() == [255, 255, 255] and got[0, 0].tolist() == [255, 0, 0]
    # CMYK: PIL's conversion
    cmyk = Image.fromarray(noise(5, 1, 4)[0]).convert("CMYK")
    path = _save(cmyk, tmp_path / "cmyk.tif")
    assert Image.open(path).mode == "CMYK"
    assert np.array_equal(decode_image(path, 4), np.asarray(cmyk.convert("RGB")))
    # I (32-bit integer) holding 16-bit values, as 16-bit PGM files open
    pgm = _save(Image.fromarray(GREY16), tmp_path / "g.pgm")
    assert Image.open(pgm).mode == "I"
    assert np.array_equal(decode_image(pgm, 4), WANT16)


def test_undefined_ranges_are_refused_in_one_line(tmp_path):
    f = _save(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)), tmp_path / "f.tif")
    msg = one_line_error(decode_image, f, 4)
    assert "f.tif" in msg and "mode F" in msg and "8- or 16-bit" in msg
    big = _save(Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)), tmp_path / "i.tif")
    msg = one_line_error(decode_image, big, 4)
    assert "i.tif" in msg and "mode I" in msg and "70000" in msg
    neg = _save(Image.fromarray(np.full((4, 4), -5, dtype=np.int32)), tmp_path / "n.tif")
    assert "mode I" in one_line_error(decode_image, neg, 4)


def test_sub_folder_in_a_class_folder_is_refused_not_silently_skipped(tmp_path):
    """Images in a folder below a class folder are not read; the loader says so in one line (and a
    link back up is named as a symlink loop) instead of leaving them out of the class."""
    root = tmp_path / "folders"
    for split, c in [("train", "a"), ("test", "b")]:
        (root / split / c).mkdir(parents=True)
        for r in range(2):
            Image.fromarray(noise(r, 1)[0]).save(root / split / c / f"{r}.png")
    (root / "train" / "a" / "more").mkdir()
    Image.fromarray(noise(9, 1)[0]).save(root / "train" / "a" / "more" / "2.png")
    msg = one_line_error(load_custom, str(root), cache_dir=str(tmp_path / "cache"), image_size=8)
    assert "sub-folder more/" in msg and str(root / "train" / "a") in msg
    (root / "train" / "a" / "more" / "2.png").rename(root / "train" / "a" / "2.png")
    (root / "train" / "a" / "more").rmdir()
    os.symlink(root, root / "train" / "a" / "again")
    msg = one_line_error(load_custom, str(root), cache_dir=str(tmp_path / "cache"), image_size=8)
    assert "again" in msg and "symlink loop" in msg
    (root / "train" / "a" / "again").unlink()
    (root / "train" / "a" / ".ipynb_checkpoints").mkdir()  # hidden folders are not part of the class
    assert len(load_custom(str(root), cache_dir=str(tmp_path / "cache"), image_size=8).images) == 5


def test_cli_says_once_which_image_modes_were_converted(tmp_path, capsys):
    """A run on 16-bit images prints one ``note:`` line naming the conversion (not a Python warning)."""
    from fewshot_nsl.cli import main

    rng = np.random.default_rng(0)
    root = tmp_path / "data16"
    for split, n_classes in (("train", 3), ("val", 2), ("test", 2)):
        for c in range(n_classes):
            d = root / split / f"{split}{c}"
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 65535, size=(16, 16), dtype=np.uint16)).save(d / f"{i}.png")
    argv = ["--dataset", "custom", "--data-root", str(root), "--method", "nearest_neighbor", "--profile", "smoke",
            "--ways", "2", "--shots", "1", "--queries", "1", "--n-episodes", "2", "--image-size", "16",
            "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 0
    out = capsys.readouterr()
    lines = (out.out + out.err).splitlines()
    notes = [line for line in lines if line.startswith("note:") and "I;16" in line]
    assert len(notes) == 1, lines
    assert not any("ImageModeWarning" in line or "warnings.warn" in line for line in lines)
