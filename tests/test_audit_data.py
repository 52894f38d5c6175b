"""Under a Python audit hook, a custom dataset's load and a smoke benchmark cell open no file under the
data root that is outside the listing recorded behind the store's cache key (issue 25).

The hook (:mod:`open_audit`) is installed once per process and records ``open`` events only while a
test asks it to.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from PIL import Image

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from open_audit import opened_under, real, recording_opens  # noqa: E402

import fewshot_nsl  # noqa: E402
from fewshot_nsl.registry import create_dataset  # noqa: E402

TRAIN, TEST = 5, 5  # classes per split: 5-way episodes in training and test


def _image(rng: np.random.Generator, c: int, size: int = 32) -> np.ndarray:
    """``uint8 (size, size, 3)``: a class colour plus noise."""
    base = np.array([40 * (c % 6), 60 * (c % 4), 255 - 20 * c], dtype=np.int16)
    return np.clip(base + rng.integers(-30, 31, (size, size, 3)), 0, 255).astype(np.uint8)


def write_dataset(root: Path, layout: str, seed: int = 0) -> Dict[str, Path]:
    """A custom dataset (``ravi``: images/ + CSVs, half the images dot-named; ``folders``: class
    folders with a hidden file and a note beside the images); returns ``{key: image path}``."""
    rng = np.random.default_rng(seed)
    files: Dict[str, Path] = {}
    rows: Dict[str, List[str]] = {"train": ["filename,label"], "test": ["filename,label"]}
    for split, n_classes, per_class in (("train", TRAIN, 4), ("test", TEST, 3)):
        for c in range(n_classes):
            label = f"{split}{c}"
            for r in range(per_class):
                if layout == "ravi":
                    name = f"{'.' if r % 2 else ''}{label}_{r}.png"
                    path = root / "images" / name
                    rows[split].append(f"{name},{label}")
                else:
                    path = root / split / label / f"{r}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_image(rng, c + (0 if split == "train" else TRAIN))).save(path)
                files[f"{label}_{r}"] = path
            if layout == "folders":
                (root / split / label / ".DS_Store").write_bytes(b"junk")
                (root / split / label / "notes.txt").write_text("not an image")
    if layout == "ravi":
        for split, lines in rows.items():
            (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return files


def listed(store) -> set:
    return {real(p) for p in store.source_files}


@pytest.mark.parametrize("layout", ["ravi", "folders"])
def test_custom_load_opens_only_the_listed_files(tmp_path, layout):
    root = tmp_path / "data"
    files = write_dataset(root, layout)
    cache = str(tmp_path / "cache")
    with recording_opens() as events:
        store = create_dataset("custom", data_root=str(root), cache_dir=cache, image_size=16)
    opened = opened_under(root, events)
    assert opened == listed(store), (sorted(opened ^ listed(store)))
    assert {real(p) for p in files.values()} <= opened  # the dot-named images were read, and listed
    with recording_opens() as events:  # from the cache: only files of the same listing are opened
        cached = create_dataset("custom", data_root=str(root), cache_dir=cache, image_size=16)
    assert listed(cached) == listed(store) and opened_under(root, events) <= listed(store)


def _cell(root: Path, results: Path, cache: Path):
    return fewshot_nsl.benchmark(
        method="protonet", shots=1, dataset="custom", data_root=str(root), profile="smoke",
        results_dir=str(results), cache_dir=str(cache), threads=1,
        eval={"episodes": 3, "queries": 2}, episodic={"steps": 2, "queries": 2},
    )


def test_smoke_cell_opens_only_the_listed_files_and_sees_replaced_images(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    files = write_dataset(root, "ravi")
    with recording_opens() as events:
        rows = _cell(root, tmp_path / "results", cache)
    store = create_dataset("custom", data_root=str(root), cache_dir=str(cache / "stores"), image_size=32)
    opened = opened_under(root, events)
    assert opened and opened <= listed(store), sorted(opened - listed(store))
    assert rows["dataset_fingerprint"].iloc[0] == store.fingerprint()

    # replace the dot-named images: a new run, even into a new results folder, reads the new pixels
    for key, path in files.items():
        if path.name.startswith("."):
            Image.fromarray(255 - np.asarray(Image.open(path))).save(path)
    with recording_opens() as events:
        again = _cell(root, tmp_path / "results-2", cache)
    fresh = create_dataset("custom", data_root=str(root), cache_dir=str(tmp_path / "fresh"), image_size=32)
    assert again["dataset_fingerprint"].iloc[0] == fresh.fingerprint() != store.fingerprint()
    assert opened_under(root, events) <= listed(fresh)
