"""Tests for the Mini-ImageNet and custom loaders in ``fewshot_nsl.data.formats``.

Every Mini-ImageNet format is written from the same tiny random data (the 100 real
canonical wnids, a few images per class) and must give the same store.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict

import h5py
import numpy as np
import pytest
from PIL import Image

from fewshot_nsl.data import formats
from fewshot_nsl.data.formats import (
    FORMAT_FOLDERS,
    FORMAT_HDF5,
    FORMAT_L2L,
    FORMAT_METAOPTNET,
    FORMAT_RAVI,
    SafeUnpickler,
    build_store,
    canonical_split,
    load_custom,
    load_miniimagenet,
    read_pickle,
)
from fewshot_nsl.data.store import SPLITS
from fewshot_nsl.errors import DataError
from fewshot_nsl.registry import DATASETS

N_PER_CLASS = 22
SPLIT = canonical_split()
SplitData = Dict[str, Dict[str, np.ndarray]]  # {split: {class: uint8 (n, H, W, 3)}}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch the user's cache."""
    monkeypatch.setenv("FEWSHOT_NSL_CACHE", str(tmp_path / "default-cache"))


# ----------------------------------------------------------------------------- fake data


def smooth_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``uint8 (n, size, size, 3)``: random low-frequency images (JPEG-friendly)."""
    low = rng.integers(0, 256, (n, 5, 5, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BILINEAR)) for a in low])


def make_data(seed: int = 0, per_class: int = N_PER_CLASS, size: int = 84, classes=None) -> SplitData:
    """Random images for ``classes`` (default: the 100 canonical wnids, in canonical splits)."""
    rng = np.random.default_rng(seed)
    classes = classes or SPLIT
    return {s: {c: smooth_images(rng, per_class, size) for c in classes[s]} for s in classes}


def shuffled(data: Dict[str, np.ndarray], seed: int, rank_is_position: bool = False):
    """Images of all classes in one shuffled array, with each class's indices in rank order.

    With ``rank_is_position`` the classes are interleaved but each class's images keep their
    rank order (MetaOptNet, where the rank is the order of appearance).
    """
    rng = np.random.default_rng(seed)
    owners = [(c, r) for c, a in data.items() for r in range(len(a))]
    perm = rng.permutation(len(owners))
    if rank_is_position:
        cls = [owners[p][0] for p in perm]
        seen: Dict[str, int] = {}
        for i, c in enumerate(cls):
            perm[i] = owners.index((c, seen.setdefault(c, 0)))
            seen[c] += 1
    images = np.stack([data[owners[p][0]][owners[p][1]] for p in perm])
    where = {owners[p]: i for i, p in enumerate(perm)}
    index = {c: [where[(c, r)] for r in range(len(a))] for c, a in data.items()}
    return images, index


def save_images(jobs) -> None:
    """Encode ``(uint8 image, path, PIL save kwargs)`` jobs with a thread pool."""
    def save(job):
        img, path, kwargs = job
        Image.fromarray(img).save(path, **kwargs)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(save, jobs))


def write_ravi(root: Path, data: SplitData, ext: str = "jpg", seed: int = 1) -> Path:
    """``images/`` + CSVs; file numbers are permuted and rows of classes interleaved, so the rank
    can only come from the row order within a class."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    kwargs = {"format": "JPEG", "quality": 95} if ext == "jpg" else {"format": "PNG", "compress_level": 1}
    jobs = []
    for split, classes in data.items():
        rows = []
        for c, arr in classes.items():
            numbers = rng.permutation(len(arr)) + 1
            names = [f"{c}{n:08d}.{ext}" for n in numbers]
            jobs += [(img, root / "images" / name, kwargs) for name, img in zip(names, arr)]
            rows.append([(n, c) for n in names])
        lines, queues = ["filename,label"], [list(r) for r in rows]
        while any(queues):  # round-robin interleave, within-class order kept
            for q in queues:
                if q:
                    n, c = q.pop(0)
                    lines.append(f"{n},{c}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    save_images(jobs)
    return root


def write_folders(root: Path, data: SplitData) -> Path:
    jobs = []
    for split, classes in data.items():
        for c, arr in classes.items():
            (root / split / c).mkdir(parents=True)
            jobs += [(img, root / split / c / f"{r:03d}.png", {"compress_level": 1}) for r, img in enumerate(arr)]
    save_images(jobs)
    return root


def write_l2l(
    root: Path, data: SplitData, val_name: str = "validation", bytes_keys=("val",), protocol: int = 4
) -> Path:
    """learn2learn pickles; the val file uses bytes keys by default."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (split, classes) in enumerate(data.items()):
        images, index = shuffled(classes, seed=10 + i)
        obj = {"image_data": images, "class_dict": index}
        if split in bytes_keys:
            obj = {b"image_data": images, b"class_dict": {c.encode(): v for c, v in index.items()}}
        name = {"train": "train", "val": val_name, "test": "test"}[split]
        with open(root / f"mini-imagenet-cache-{name}.pkl", "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
    return root


def py2_pickle(obj) -> bytes:
    """A protocol-2 pickle as Python 2 writes it (``str`` as BINSTRING, ``numpy.core`` globals)."""
    out = bytearray(b"\x80\x02")

    def string(b: bytes) -> None:
        out.extend(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b)

    def integer(v: int) -> None:
        out.extend(b"J" + struct.pack("<i", v))

    def emit(o) -> None:
        if isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                emit(k)
                emit(v)
            out.extend(b"u")
        elif isinstance(o, list):
            out.extend(b"](")
            for v in o:
                emit(v)
            out.extend(b"e")
        elif isinstance(o, str):
            string(o.encode("latin1"))
        elif isinstance(o, (int, np.integer)):
            integer(int(o))
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            integer(0)
            out.extend(b"\x85")
            string(b"b")
            out.extend(b"\x87R(")
            integer(1)
            out.extend(b"(")
            for d in o.shape:
                integer(d)
            out.extend(b"tcnumpy\ndtype\n")
            string(b"u1")
            integer(0)
            integer(1)
            out.extend(b"\x87R(")
            integer(3)
            string(b"|")
            out.extend(b"NNN")
            integer(-1)
            integer(-1)
            integer(0)
            out.extend(b"tb\x89")
            string(np.ascontiguousarray(o).tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    emit(obj)
    out.extend(b".")
    return bytes(out)


def write_metaoptnet(root: Path, data: SplitData, py2_splits=("val", "test")) -> Path:
    """Labels run on across splits (val starts at 64), as in the MetaOptNet files."""
    root.mkdir(parents=True, exist_ok=True)
    offset = 0
    for i, (split, classes) in enumerate(data.items()):
        images, index = shuffled(classes, seed=20 + i, rank_is_position=True)
        catname2label = {c: offset + k for k, c in enumerate(classes)}
        labels = [0] * len(images)
        for c, idx in index.items():
            for j in idx:
                labels[j] = catname2label[c]
        offset += len(classes)
        obj = {"data": images, "labels": labels, "catname2label": catname2label}
        path = root / formats._METAOPTNET_FILES[split]
        if split in py2_splits:
            path.write_bytes(py2_pickle(obj))
        else:
            with open(path, "wb") as f:
                pickle.dump(obj, f, protocol=2)
    return root


def write_hdf5(root: Path, data: SplitData) -> Path:
    """Labels JSON in reversed order, so the class order must come from the canonical split."""
    root.mkdir(parents=True, exist_ok=True)
    for split, classes in data.items():
        with h5py.File(root / f"{split}_data.hdf5", "w") as f:
            g = f.create_group("datasets")
            for c, arr in classes.items():
                g.create_dataset(c, data=arr)
        (root / f"{split}_labels.json").write_text(json.dumps(list(classes)[::-1]))
    return root


def expected_arrays(data: SplitData, classes=None):
    """The store every format must give: canonical class order, images in rank order."""
    classes = classes or SPLIT
    names = [c for s in SPLITS for c in classes.get(s, [])]
    splits = [s for s in SPLITS for _ in classes.get(s, [])]
    images = np.concatenate([data[s][c] for s, c in zip(splits, names)])
    labels = np.repeat(np.arange(len(names)), [len(data[s][c]) for s, c in zip(splits, names)])
    return names, splits, images, labels


def error_of(fn, *args, **kwargs) -> str:
    """The one-line DataError message ``fn`` raises."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg, msg
    return msg


def load(root: Path, tmp_path: Path, **kwargs):
    kwargs.setdefault("expected_per_class", N_PER_CLASS)
    return build_store(str(root), cache_dir=str(tmp_path / "cache"), **kwargs)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """The same tiny data written in all five formats."""
    base = tmp_path_factory.mktemp("mini")
    data = make_data()
    roots = {
        FORMAT_RAVI: write_ravi(base / "ravi", data),
        FORMAT_FOLDERS: write_folders(base / "folders", data),
        FORMAT_L2L: write_l2l(base / "l2l", data),
        FORMAT_METAOPTNET: write_metaoptnet(base / "metaoptnet", data),
        FORMAT_HDF5: write_hdf5(base / "hdf5", data),
    }
    return data, roots


@pytest.fixture(scope="module")
def stores(mini, tmp_path_factory):
    data, roots = mini
    cache = tmp_path_factory.mktemp("stores-cache")
    return {
        fmt: build_store(str(root), cache_dir=str(cache), expected_per_class=N_PER_CLASS)
        for fmt, root in roots.items()
    }


# ----------------------------------------------------------------------------- all formats agree


def test_canonical_split_matches_shared_file_and_csvs():
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "miniimagenet_ravi_split.json"
    if shared.is_file():
        assert canonical_split(shared) == SPLIT
    assert [len(SPLIT[s]) for s in SPLITS] == [64, 16, 20]
    for s in SPLITS:
        lines = (formats.RAVI_CSV_DIR / f"{s}.csv").read_text().splitlines()
        assert lines[0] == "filename,label" and len(lines) == 1 + 600 * len(SPLIT[s])
        assert list(dict.fromkeys(line.split(",")[1] for line in lines[1:])) == SPLIT[s]
    assert (formats.RAVI_CSV_DIR / "LICENSE").is_file()


@pytest.mark.parametrize("fmt", [FORMAT_FOLDERS, FORMAT_L2L, FORMAT_METAOPTNET, FORMAT_HDF5])
def test_lossless_formats_give_the_canonical_store(mini, stores, fmt):
    data, roots = mini
    names, splits, images, labels = expected_arrays(data)
    store = stores[fmt]
    assert store.name == "miniimagenet" and not store.synthetic
    assert store.source == f"{fmt} at {roots[fmt].resolve()}"
    assert store.class_names == names and store.class_splits == splits
    assert store.split_counts() == {"train": 64, "val": 16, "test": 20}
    np.testing.assert_array_equal(store.labels, labels)
    assert store.images.shape == (100 * N_PER_CLASS, 84, 84, 3) and store.images.dtype == np.uint8
    assert np.array_equal(np.asarray(store.images), images)
    assert store.fingerprint() == stores[FORMAT_FOLDERS].fingerprint()
    # an image is addressed by (wnid, rank)
    c = store.class_index()[SPLIT["val"][3]]
    np.testing.assert_array_equal(store.images[store.index_of(c, [5])[0]], data["val"][SPLIT["val"][3]][5])


def test_jpeg_ravi_format_matches_within_jpeg_error(mini, stores):
    data, _ = mini
    names, splits, images, labels = expected_arrays(data)
    store = stores[FORMAT_RAVI]
    assert store.class_names == names and store.class_splits == splits
    np.testing.assert_array_equal(store.labels, labels)
    err = np.abs(np.asarray(store.images, dtype=np.int16) - images.astype(np.int16)).mean(axis=(1, 2, 3))
    assert err.max() < 4.0, err.max()  # any mix-up of ranks would give errors of ~50-80
    assert err.mean() < 2.0, err.mean()


def test_public_loader_and_registry(mini, tmp_path, monkeypatch):
    _, roots = mini
    assert DATASETS.get("miniimagenet") is load_miniimagenet and DATASETS.get("custom") is load_custom
    msg = error_of(load_miniimagenet, str(roots[FORMAT_HDF5]), cache_dir=str(tmp_path))
    assert "has 22 images, expected 600" in msg and "train_data.hdf5" in msg
    monkeypatch.setattr(formats.build, "EXPECTED_PER_CLASS", N_PER_CLASS)
    store = DATASETS.create("miniimagenet", data_root=str(roots[FORMAT_HDF5]), cache_dir=str(tmp_path))
    assert store.num_classes == 100 and len(store.images) == 100 * N_PER_CLASS


def test_small_images_are_resized(tmp_path):
    data = make_data(seed=5, per_class=2, size=32)
    folders = write_folders(tmp_path / "folders", data)
    l2l = write_l2l(tmp_path / "l2l", data, val_name="val", protocol=5)
    a = load(folders, tmp_path, expected_per_class=2)
    b = load(l2l, tmp_path, expected_per_class=2)
    _, _, images, _ = expected_arrays(data)
    want = np.stack([np.asarray(Image.fromarray(x).resize((84, 84), Image.Resampling.BICUBIC)) for x in images])
    assert a.images.shape == b.images.shape == (200, 84, 84, 3)
    assert np.array_equal(np.asarray(a.images), want) and np.array_equal(np.asarray(b.images), want)
    c = load(l2l, tmp_path, expected_per_class=2, image_size=16)
    assert c.images.shape == (200, 16, 16, 3)


# ----------------------------------------------------------------------------- cache


def test_cache_is_memory_mapped_and_skips_decoding(mini, tmp_path, monkeypatch):
    _, roots = mini
    first = load(roots[FORMAT_FOLDERS], tmp_path)
    cached = [p.name for p in (tmp_path / "cache").iterdir()]
    assert len(cached) == 1 and cached[0].startswith("miniimagenet-") and len(cached[0]) == len("miniimagenet-") + 16

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(formats.images, "decode_image", no_decoding)
    t0 = time.perf_counter()
    second = load(roots[FORMAT_FOLDERS], tmp_path)
    assert time.perf_counter() - t0 < 5
    assert isinstance(second.images, np.memmap)
    assert second.fingerprint() == first.fingerprint()
    assert second.class_names == first.class_names and second.source == first.source

    # a changed source file (new mtime) invalidates the key
    some = next((roots[FORMAT_FOLDERS] / "test").iterdir()) / "000.png"
    st = some.stat()
    os.utime(some, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        with pytest.raises(AssertionError, match="decoded again"):
            load(roots[FORMAT_FOLDERS], tmp_path)
    finally:
        os.utime(some, ns=(st.st_atime_ns, st.st_mtime_ns))
    # other options give another key
    with pytest.raises(AssertionError, match="decoded again"):
        load(roots[FORMAT_FOLDERS], tmp_path, image_size=64)


def test_pickle_cache_skips_unpickling(tmp_path, monkeypatch):
    data = make_data(seed=3, per_class=1, size=8)
    root = write_l2l(tmp_path / "l2l", data)
    first = load(root, tmp_path, expected_per_class=1)
    monkeypatch.setattr(formats.pickles, "read_pickle", lambda path: pytest.fail("unpickled again"))
    second = load(root, tmp_path, expected_per_class=1)
    assert isinstance(second.images, np.memmap) and second.fingerprint() == first.fingerprint()


# ----------------------------------------------------------------------------- safe pickles


class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvilSubprocess:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (subprocess.call, (["sh", "-c", self.command],))


@pytest.mark.parametrize("payload", [_Evil, _EvilSubprocess])
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_without_running(tmp_path, payload, protocol):
    sentinel = tmp_path / "SENTINEL"
    root = tmp_path / "src"
    root.mkdir()
    for name in ("train", "validation", "test"):
        obj = {"image_data": payload(f"touch {sentinel}"), "class_dict": {}}
        (root / f"mini-imagenet-cache-{name}.pkl").write_bytes(pickle.dumps(obj, protocol=protocol))
    msg = error_of(load, root, tmp_path)
    assert "mini-imagenet-cache-train.pkl" in msg and "refusing" in msg
    assert not sentinel.exists()
    msg = error_of(read_pickle, root / "mini-imagenet-cache-test.pkl")
    assert not sentinel.exists()


def test_safe_unpickler_reads_numpy_pickles_of_every_protocol(tmp_path):
    arr = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    obj = {"a": arr, "b": [1, 2], b"c": np.int64(7), "d": np.float32(0.5)}
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        got = read_pickle(path)
        assert np.array_equal(got["a"], arr) and got["b"] == [1, 2] and got[b"c"] == 7
    py2 = tmp_path / "py2.pickle"
    py2.write_bytes(py2_pickle({"data": arr, "labels": [64, 65], "catname2label": {"n0": 64, "n1": 65}}))
    got = read_pickle(py2)
    assert np.array_equal(got["data"], arr) and got["catname2label"] == {"n0": 64, "n1": 65}
    assert SafeUnpickler.ALLOWED  # the whitelist is explicit


# ----------------------------------------------------------------------------- bad sources

TINY = {"train": [SPLIT["train"][0], SPLIT["train"][1]], "val": [SPLIT["val"][0]], "test": [SPLIT["test"][0]]}


def tiny_data(size: int = 8, per_class: int = 2) -> SplitData:
    return make_data(seed=7, per_class=per_class, size=size, classes=TINY)


def test_missing_and_empty_roots(tmp_path):
    msg = error_of(load_miniimagenet, None, cache_dir=str(tmp_path))
    assert "no Mini-ImageNet data root" in msg and "--data-root" in msg
    missing = tmp_path / "nowhere"
    msg = error_of(load_miniimagenet, str(missing), cache_dir=str(tmp_path))
    assert str(missing) in msg and "does not exist" in msg and "images/+train.csv" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = error_of(load_miniimagenet, str(empty))
    assert str(empty) in msg and "empty directory" in msg
    msg = error_of(load_custom, str(empty))
    assert str(empty) in msg and "empty directory" in msg
    (empty / "readme.txt").write_text("hi")
    msg = error_of(load_miniimagenet, str(empty))
    assert "no known Mini-ImageNet layout" in msg and "readme.txt" in msg


def test_nested_root_and_several_formats(tmp_path):
    data = tiny_data()
    write_hdf5(tmp_path / "outer" / "mini-imagenet", data)
    msg = error_of(load, tmp_path / "outer", tmp_path)
    assert "mini-imagenet/" in msg and "--data-root" in msg
    root = write_l2l(tmp_path / "both", data)
    write_hdf5(root, data)
    msg = error_of(load, root, tmp_path)
    assert FORMAT_L2L in msg and FORMAT_HDF5 in msg and "train_data.hdf5" in msg
    msg = error_of(load_custom, str(write_l2l(tmp_path / "pk", data)), cache_dir=str(tmp_path))
    assert FORMAT_L2L in msg and "--dataset miniimagenet" in msg


def test_missing_split_file(tmp_path):
    root = write_metaoptnet(tmp_path / "m", tiny_data())
    (root / "miniImageNet_category_split_val.pickle").unlink()
    msg = error_of(load, root, tmp_path, allow_noncanonical_split=True)
    assert "miniImageNet_category_split_val.pickle" in msg and "missing" in msg
    root = write_l2l(tmp_path / "both-val", tiny_data())
    (root / "mini-imagenet-cache-val.pkl").write_bytes((root / "mini-imagenet-cache-validation.pkl").read_bytes())
    msg = error_of(load, root, tmp_path, allow_noncanonical_split=True)
    assert "mini-imagenet-cache-val.pkl" in msg and "keep only one" in msg


def test_html_page_saved_as_pickle(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    page = b"\n<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head></html>"
    for name in ("train", "val", "test"):
        (root / f"mini-imagenet-cache-{name}.pkl").write_bytes(page)
    msg = error_of(load, root, tmp_path)
    assert "mini-imagenet-cache-train.pkl" in msg and "HTML page" in msg and "Google Drive" in msg and "re-download" in msg
    (root / "mini-imagenet-cache-train.pkl").write_bytes(b"")
    msg = error_of(load, root, tmp_path)
    assert "mini-imagenet-cache-train.pkl" in msg and "empty" in msg


def test_truncated_pickle(tmp_path):
    root = write_metaoptnet(tmp_path / "m", tiny_data(), py2_splits=())
    for name, split in (("train_phase_train", "train"), ("val", "val")):
        path = root / f"miniImageNet_category_split_{name}.pickle"
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
        msg = error_of(load, root, tmp_path, allow_noncanonical_split=True)
        assert path.name in msg and "truncated" in msg and "re-download" in msg
        path.write_bytes(blob)


def test_truncated_hdf5(tmp_path):
    data = tiny_data(size=84, per_class=40)
    root = write_hdf5(tmp_path / "h", data)
    path = root / "test_data.hdf5"
    blob = path.read_bytes()
    for cut in (len(blob) // 2, 100):
        path.write_bytes(blob[:cut])
        msg = error_of(load, root, tmp_path, allow_noncanonical_split=True)
        assert "test_data.hdf5" in msg and "truncated" in msg
    path.write_bytes(b"<html><body>quota exceeded</body></html>")
    msg = error_of(load, root, tmp_path, allow_noncanonical_split=True)
    assert "test_data.hdf5" in msg and "HTML page" in msg


def test_truncated_jpeg(tmp_path):
    root = write_ravi(tmp_path / "r", tiny_data(size=84))
    victim = sorted((root / "images").glob(f"{TINY['test'][0]}*.jpg"))[0]
    blob = victim.read_bytes()
    victim.write_bytes(blob[: len(blob) // 2])
    msg = error_of(load_custom, str(root), cache_dir=str(tmp_path))
    assert victim.name in msg and "truncated" in msg
    victim.write_bytes(blob[:20])
    msg = error_of(load, root, tmp_path, allow_noncanonical_split=True)
    assert victim.name in msg


def test_csv_problems(tmp_path):
    root = write_ravi(tmp_path / "r", tiny_data(), ext="png")
    csv_path = root / "val.csv"
    good = csv_path.read_text()
    # a CSV naming a missing image
    csv_path.write_text(good + f"n0000000000000042.png,{TINY['val'][0]}\n")
    msg = error_of(load_custom, str(root), cache_dir=str(tmp_path))
    assert "val.csv" in msg and "n0000000000000042.png" in msg and "missing" in msg
    # non-UTF-8
    csv_path.write_bytes(good.encode() + "caf\xe9.png,caf\xe9\n".encode("latin1"))
    msg = error_of(load_custom, str(root), cache_dir=str(tmp_path))
    assert "val.csv" in msg and "UTF-8" in msg
    # duplicated file names, within one CSV and across CSVs
    first_row = good.splitlines()[1]
    csv_path.write_text(good + first_row + "\n")
    msg = error_of(load_custom, str(root), cache_dir=str(tmp_path))
    assert "val.csv" in msg and first_row.split(",")[0] in msg and "duplicate" in msg
    train_row = (root / "train.csv").read_text().splitlines()[1]
    csv_path.write_text(good + train_row + "\n")
    msg = error_of(load_custom, str(root), cache_dir=str(tmp_path))
    assert "train.csv" in msg and "val.csv" in msg and train_row.split(",")[0] in msg
    # bad header and an HTML page saved as CSV
    csv_path.write_text("name;class\n" + good)
    msg = error_of(load_custom, str(root), cache_dir=str(tmp_path))
    assert "val.csv" in msg and "header" in msg
    csv_path.write_text("<!doctype html><html></html>")
    msg = error_of(load_custom, str(root), cache_dir=str(tmp_path))
    assert "val.csv" in msg and "HTML page" in msg


def test_class_in_two_splits(tmp_path):
    data = tiny_data()
    moved = TINY["train"][0]
    data["val"][moved] = data["train"][moved]
    msg = error_of(load, write_l2l(tmp_path / "l", data), tmp_path, allow_noncanonical_split=True)
    assert moved in msg and "mini-imagenet-cache-train.pkl" in msg and "mini-imagenet-cache-validation.pkl" in msg
    msg = error_of(load_custom, str(write_folders(tmp_path / "f", data)), cache_dir=str(tmp_path))
    assert moved in msg and "train" in msg and "val" in msg and "exactly one split" in msg
    msg = error_of(load_custom, str(write_ravi(tmp_path / "r", data, ext="png")), cache_dir=str(tmp_path))
    assert moved in msg and "train.csv" in msg and "val.csv" in msg
    # same class name, different files, in two CSVs
    data = tiny_data()
    root = write_ravi(tmp_path / "r2", data, ext="png")
    val_class = TINY["val"][0]
    (root / "val.csv").write_text((root / "val.csv").read_text().replace(f",{val_class}", f",{moved}"))
    msg = error_of(load_custom, str(root), cache_dir=str(tmp_path))
    assert moved in msg and "train.csv" in msg and "val.csv" in msg and "exactly one split" in msg


def test_labels_out_of_range_and_bad_arrays(tmp_path):
    data = tiny_data()
    root = write_metaoptnet(tmp_path / "m", data, py2_splits=())
    path = root / "miniImageNet_category_split_test.pickle"
    obj = pickle.loads(path.read_bytes())
    obj["labels"][0] = 99
    path.write_bytes(pickle.dumps(obj, protocol=2))
    msg = error_of(load, root, tmp_path, allow_noncanonical_split=True)
    assert path.name in msg and "label 99 is out of range" in msg

    root = write_l2l(tmp_path / "l", data)
    path = root / "mini-imagenet-cache-test.pkl"
    obj = pickle.loads(path.read_bytes())
    obj["class_dict"][TINY["test"][0]][0] = 1000
    path.write_bytes(pickle.dumps(obj))
    msg = error_of(load, root, tmp_path, allow_noncanonical_split=True)
    assert path.name in msg and "1000" in msg and "out of range" in msg

    obj["class_dict"][TINY["test"][0]][0] = 0
    obj["image_data"] = obj["image_data"].astype(np.float32)
    path.write_bytes(pickle.dumps(obj))
    msg = error_of(load, root, tmp_path, allow_noncanonical_split=True)
    assert path.name in msg and "uint8" in msg and "float32" in msg

    obj["image_data"] = obj["image_data"].astype(np.uint8)[..., 0]
    path.write_bytes(pickle.dumps(obj))
    msg = error_of(load, root, tmp_path, allow_noncanonical_split=True)
    assert path.name in msg and "(N, H, W, 3)" in msg


def test_canonical_split_checks(tmp_path):
    data = make_data(seed=9, per_class=1, size=8)
    # a wnid that is not a Mini-ImageNet class
    bad = {s: dict(c) for s, c in data.items()}
    bad["test"]["n99999999"] = bad["test"].pop(SPLIT["test"][0])
    msg = error_of(load, write_hdf5(tmp_path / "a", bad), tmp_path, expected_per_class=1)
    assert "n99999999" in msg and "test_labels.json" not in msg and "test_data.hdf5" in msg
    assert "allow_noncanonical_split" in msg
    # a class in the wrong split
    bad = {s: dict(c) for s, c in data.items()}
    bad["val"][SPLIT["train"][5]] = bad["train"].pop(SPLIT["train"][5])
    msg = error_of(load, write_hdf5(tmp_path / "b", bad), tmp_path, expected_per_class=1)
    assert SPLIT["train"][5] in msg and "val_data.hdf5" in msg and "canonical" in msg
    # ... which allow_noncanonical_split accepts, keeping the source's splits
    store = load(tmp_path / "b", tmp_path, expected_per_class=1, allow_noncanonical_split=True)
    assert store.split_counts() == {"train": 63, "val": 17, "test": 20}
    assert store.class_splits[store.class_index()[SPLIT["train"][5]]] == "val"
    # missing classes
    bad = {s: dict(c) for s, c in data.items()}
    del bad["val"][SPLIT["val"][2]]
    msg = error_of(load, write_hdf5(tmp_path / "c", bad), tmp_path, expected_per_class=1)
    assert "val split in" in msg and "has 15 of its 16" in msg and SPLIT["val"][2] in msg and str(tmp_path / "c") in msg
    # wrong number of images in one class
    bad = {s: dict(c) for s, c in data.items()}
    bad["train"][SPLIT["train"][0]] = np.concatenate([bad["train"][SPLIT["train"][0]]] * 2)
    msg = error_of(load, write_hdf5(tmp_path / "d", bad), tmp_path, expected_per_class=1)
    assert SPLIT["train"][0] in msg and "has 2 images, expected 1" in msg and "train_data.hdf5" in msg


def test_folder_problems(tmp_path):
    root = write_folders(tmp_path / "f", tiny_data())
    empty = root / "train" / "nothing_here"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    msg = error_of(load_custom, str(root), cache_dir=str(tmp_path))
    assert str(empty) in msg and "no .jpg" in msg
    (empty / "notes.txt").unlink()
    empty.rmdir()
    Image.new("RGB", (8, 8)).save(root / "test" / "loose.png")
    msg = error_of(load_custom, str(root), cache_dir=str(tmp_path))
    assert "loose.png" in msg and "sub-folder per class" in msg
    (root / "test" / "loose.png").unlink()
    for d in (root / "test").iterdir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    msg = error_of(load_custom, str(root), cache_dir=str(tmp_path))
    assert str(root / "test") in msg and "no class folders" in msg


# ----------------------------------------------------------------------------- custom


def test_custom_folders_any_names_and_counts(tmp_path):
    rng = np.random.default_rng(11)
    layout = {"train": {"chat noir": 3, "Zebra_2": 5, "éléphant": 4}, "test": {"0-apple": 2, "pear": 6}}
    root = tmp_path / "custom"
    expected = {}
    for split, classes in layout.items():
        for c, n in classes.items():
            (root / split / c).mkdir(parents=True)
            for r in range(n):
                img = smooth_images(rng, 1, 20 + r)[0]  # assorted sizes, resized to 84
                mode_img = Image.fromarray(img)
                if r == 1:
                    mode_img = mode_img.convert("L")
                elif r == 2:
                    mode_img = mode_img.convert("RGBA")
                mode_img.save(root / split / c / f"img{r:02d}.png")
                expected[(c, r)] = np.asarray(
                    mode_img.convert("RGB").resize((84, 84), Image.Resampling.BICUBIC)
                )
            (root / split / c / "Thumbs.db").write_bytes(b"junk")
    store = load_custom(str(root), cache_dir=str(tmp_path / "cache"))
    assert store.name == "custom" and not store.synthetic
    assert store.class_names == ["Zebra_2", "chat noir", "éléphant", "0-apple", "pear"]  # sorted folders
    assert store.class_splits == ["train"] * 3 + ["test"] * 2
    assert store.split_counts() == {"train": 3, "val": 0, "test": 2}
    assert [store.class_size(i) for i in range(5)] == [5, 3, 4, 2, 6]
    for i, c in enumerate(store.class_names):
        for r in range(store.class_size(i)):
            np.testing.assert_array_equal(store.images[store.index_of(i, [r])[0]], expected[(c, r)])
    again = load_custom(str(root), cache_dir=str(tmp_path / "cache"))
    assert isinstance(again.images, np.memmap) and again.fingerprint() == store.fingerprint()
    small = load_custom(str(root), cache_dir=str(tmp_path / "cache"), image_size=32)
    assert small.images.shape[1:] == (32, 32, 3)


def test_custom_ravi_layout(tmp_path):
    classes = {"train": ["dog", "cat", "bird"], "val": ["fish"], "test": ["car", "boat"]}
    data = make_data(seed=4, per_class=3, size=84, classes=classes)
    data["train"]["cat"] = data["train"]["cat"][:2]
    root = write_ravi(tmp_path / "r", data, ext="png")
    store = load_custom(str(root), cache_dir=str(tmp_path / "cache"))
    assert store.class_names == ["dog", "cat", "bird", "fish", "car", "boat"]  # CSV order
    assert store.class_splits == ["train"] * 3 + ["val"] + ["test"] * 2
    assert store.class_size(1) == 2
    names, _, images, _ = expected_arrays(data, classes)
    assert np.array_equal(np.asarray(store.images), images)
    assert store.source.startswith(f"{FORMAT_RAVI} at ")
    (root / "val.csv").unlink()  # val is optional for custom data
    store = load_custom(str(root), cache_dir=str(tmp_path / "cache"))
    assert store.split_counts() == {"train": 3, "val": 0, "test": 2}
    (root / "test.csv").unlink()
    msg = error_of(load_custom, str(root), cache_dir=str(tmp_path / "cache"))
    assert "test.csv" in msg and "missing" in msg
