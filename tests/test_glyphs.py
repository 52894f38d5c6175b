"""The embedded synthetic dataset ``glyphs``: class structure, determinism, cache, checksum."""
from __future__ import annotations

import itertools
import json
import re
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fewshot_nsl.data import glyphs
from fewshot_nsl.data.store import ImageStore
from fewshot_nsl.errors import ConfigError
from fewshot_nsl.registry import DATASETS, check_kwargs

SMALL = dict(images_per_class=3, image_size=32)


@pytest.fixture(scope="module")
def small_store() -> ImageStore:
    return glyphs.generate_glyphs(seed=0, workers=1, **SMALL)


# ----------------------------------------------------------------------------- class structure


def test_default_class_structure():
    classes = glyphs.select_classes()
    assert len(classes) == 100
    splits = [g.split for g in classes]
    assert {s: splits.count(s) for s in ("train", "val", "test")} == {"train": 64, "val": 16, "test": 20}
    # train classes first, then val, then test (like Mini-ImageNet)
    assert splits == ["train"] * 64 + ["val"] * 16 + ["test"] * 20
    names = [g.name for g in classes]
    assert len(set(names)) == 100
    assert len({n.lower() for n in names}) == 100  # safe as folder names on case-insensitive file systems
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", n) for n in names), names
    assert len({g.char for g in classes}) == 100
    # every script present, 20 classes each, and every split mixes all scripts
    assert {s: sum(g.script == s for g in classes) for s in glyphs.SCRIPTS} == {s: 20 for s in glyphs.SCRIPTS}
    for split in ("train", "val", "test"):
        assert {g.script for g in classes if g.split == split} == set(glyphs.SCRIPTS)
    for g in classes:
        assert len(g.fonts) >= glyphs.MIN_FONTS
        assert g.name.startswith(g.script + "_")
        assert unicodedata.name(g.char).split()[0].lower() == g.script
    assert "latin_A" in names and "greek_lambda" in names and "greek_capital_sigma" in names
    assert any(n.startswith("cyrillic_capital_letter_") for n in names)


def test_class_selection_is_stable():
    """Class names and splits are the task definition: they must not depend on anything but the version."""
    glyphs.select_classes.cache_clear()
    glyphs.distractor_chars.cache_clear()
    again = glyphs.select_classes()
    assert [(g.name, g.split) for g in again] == [(g.name, g.split) for g in glyphs.select_classes()]
    first = glyphs.select_classes()[:5]
    assert [g.split for g in first] == ["train"] * 5


def test_fonts_cover_their_characters():
    from matplotlib.ft2font import FT2Font

    paths = glyphs.font_paths()
    assert len(paths) == 16
    assert not any(n.startswith(("LastResort", "cm", "STIXSiz", "STIXNonUni")) or "Display" in n for n in paths)
    charmaps = {f: FT2Font(str(p)).get_charmap() for f, p in paths.items()}
    for g in glyphs.select_classes():
        for f in g.fonts:
            assert ord(g.char) in charmaps[f], (g.name, f)


def test_no_confusables_chosen():
    chars = {g.char for g in glyphs.select_classes()}
    assert not chars & set("".join(glyphs.CONFUSABLES))
    # classic homoglyph groups: at most one member of each
    for group in ("AΑА", "BΒВ", "EΕЕ", "HΗН", "KΚК", "MΜМ", "OΟОoοоՕօ", "PΡРpρр", "TΤТ", "XΧХxχх",
                  "Il1ΙІ", "CСcс", "yу", "uս", "nո", "hհ", "gց", "ΦФՓ", "ΠП", "ΓГ"):
        assert len(chars & set(group)) <= 1, group
    # clutter glyphs never look like a class
    assert not set(glyphs.distractor_chars()) & chars
    assert "∑" not in glyphs.distractor_chars()  # Greek Sigma is a class


def test_no_two_classes_render_alike():
    """In DejaVu Sans, no two chosen characters render (nearly) identically: neither by the
    selection's own tolerant score nor by plain IoU of the normalised binary renders."""
    chars = [g.char for g in glyphs.select_classes()]
    sims = glyphs._similarity_matrix(chars, chars)
    np.fill_diagonal(sims, 0)
    i, j = np.unravel_index(np.argmax(sims), sims.shape)
    assert sims[i, j] < glyphs.SIMILARITY_THRESHOLD, (chars[i], chars[j], sims[i, j])
    renders = {c: glyphs.normalized_render(c, 24) for c in chars}
    for a, b in itertools.combinations(chars, 2):
        A, B = renders[a], renders[b]
        iou = (A & B).sum() / max((A | B).sum(), 1)
        assert iou < 0.9, (a, b, iou)
    # the check does flag real look-alikes
    assert glyphs.shape_similarity("C", "c") >= glyphs.SIMILARITY_THRESHOLD
    assert glyphs.too_similar("О", ["Q", "O"]) == "O"  # Cyrillic O vs Latin O


# ----------------------------------------------------------------------------- images


def test_images_shape_dtype_labels(small_store):
    s = small_store
    assert s.images.dtype == np.uint8 and s.images.shape == (300, 32, 32, 3)
    assert s.num_classes == 100 and s.split_counts() == {"train": 64, "val": 16, "test": 20}
    assert all(s.class_size(c) == 3 for c in range(100))
    assert np.array_equal(s.labels, np.repeat(np.arange(100), 3))


def test_synthetic_flag(small_store):
    assert small_store.synthetic is True
    assert small_store.name == "glyphs"
    assert "synthetic" in small_store.source and "not comparable with Mini-ImageNet" in small_store.source


def test_deterministic_and_thread_independent(small_store):
    again = glyphs.generate_glyphs(seed=0, workers=3, **SMALL)
    assert again.images.tobytes() == small_store.images.tobytes()
    assert again.fingerprint() == small_store.fingerprint()
    other = glyphs.generate_glyphs(seed=1, workers=2, **SMALL)
    assert other.fingerprint() != small_store.fingerprint()
    assert not np.array_equal(other.images, small_store.images)
    # image (c, i) depends only on (seed, c, i): fewer images per class gives a prefix
    c = 7
    two = glyphs.render_class(c, glyphs.select_classes()[c], 0, 2, 32)
    assert np.array_equal(two, small_store.images[small_store.class_members(c)[:2]])


def test_images_vary_within_class(small_store):
    s = small_store
    for c in range(s.num_classes):
        imgs = s.images[s.class_members(c)].astype(np.int16)
        for a, b in itertools.combinations(range(len(imgs)), 2):
            assert np.abs(imgs[a] - imgs[b]).mean() > 5, (s.class_names[c], a, b)
    # each image has visible structure (not a flat colour)
    assert (s.images.reshape(len(s.images), -1, 3).std(axis=1).max(axis=1) > 10).all()


def test_default_size_image():
    img = glyphs.render_image(glyphs.select_classes()[0], np.random.default_rng([0, 0, 0]), 84)
    assert img.shape == (84, 84, 3) and img.dtype == np.uint8


# ----------------------------------------------------------------------------- cache


def test_cache_memmap_and_no_regeneration(tmp_path, monkeypatch):
    first = glyphs.load_glyphs(cache_dir=str(tmp_path), seed=0, **SMALL)
    directory = tmp_path / glyphs.cache_name(0, 3, 32)
    assert directory.name == "glyphs-v1-s0-n3-32"
    assert ImageStore.is_cached(directory)
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["synthetic"] is True and meta["source"] == glyphs.SOURCE

    def boom(*args, **kwargs):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(glyphs, "generate_glyphs", boom)
    monkeypatch.setattr(glyphs, "render_class", boom)
    second = glyphs.load_glyphs(data_root="/ignored", cache_dir=str(tmp_path), seed=0, **SMALL)
    assert isinstance(second.images, np.memmap)
    assert second.fingerprint() == first.fingerprint() == meta["fingerprint"]
    assert np.array_equal(np.asarray(second.images), np.asarray(first.images))
    assert second.class_names == first.class_names and second.class_splits == first.class_splits


def test_corrupt_cache_is_regenerated(tmp_path, small_store):
    glyphs.load_glyphs(cache_dir=str(tmp_path), seed=0, **SMALL)
    directory = tmp_path / glyphs.cache_name(0, 3, 32)
    images = np.load(directory / "images.npy", mmap_mode="r+")
    images[5, 3, 3, 0] ^= 0xFF
    images.flush()
    del images
    with pytest.warns(UserWarning, match="checksum"):
        store = glyphs.load_glyphs(cache_dir=str(tmp_path), seed=0, **SMALL)
    assert store.fingerprint() == small_store.fingerprint()
    assert np.array_equal(np.asarray(store.images), small_store.images)


def test_concurrent_loads_build_the_cache_once(tmp_path, monkeypatch):
    """Loads racing on a cache miss: one builds (under the lock), the others wait and memory-map its store."""
    calls = []
    real = glyphs.generate_glyphs

    def slow(*args, **kwargs):
        calls.append(1)
        time.sleep(0.3)
        return real(*args, workers=1, **kwargs)

    monkeypatch.setattr(glyphs, "generate_glyphs", slow)
    with ThreadPoolExecutor(3) as pool:
        stores = list(pool.map(lambda _: glyphs.load_glyphs(cache_dir=str(tmp_path), seed=0, **SMALL), range(3)))
    assert len(calls) == 1
    assert len({s.fingerprint() for s in stores}) == 1 and all(isinstance(s.images, np.memmap) for s in stores)
    assert [p.name for p in tmp_path.iterdir()] == [glyphs.cache_name(0, 3, 32)]  # no lock file left


def test_unwritable_cache_gives_the_store_in_memory(tmp_path, small_store):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="cannot write the cache"):
        store = glyphs.load_glyphs(cache_dir=str(blocker / "cache"), seed=0, **SMALL)
    assert not isinstance(store.images, np.memmap) and store.fingerprint() == small_store.fingerprint()


def test_registered_and_arguments(tmp_path):
    assert DATASETS.get("glyphs") is glyphs.load_glyphs
    every = dict(data_root=None, cache_dir=None, image_size=84, images_per_class=80, seed=0)
    check_kwargs(glyphs.load_glyphs, every, "dataset 'glyphs'")
    with pytest.raises(Exception, match="accepted"):
        check_kwargs(glyphs.load_glyphs, dict(ways=5), "dataset 'glyphs'")
    with pytest.raises(ConfigError, match="seed"):
        glyphs.load_glyphs(cache_dir=str(tmp_path), seed=-1)
    with pytest.raises(ConfigError, match="image_size"):
        glyphs.load_glyphs(cache_dir=str(tmp_path), image_size=4)


def test_render_preview(tmp_path):
    path = glyphs.render_preview(tmp_path / "p.png", n_classes=2, per_class=3)
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
