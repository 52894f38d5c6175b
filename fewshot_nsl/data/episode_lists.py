"""The committed, versioned test and validation episode lists under ``episodes/``.

``python run_benchmarks.py --make-episodes`` regenerates them; it is deterministic, so a
regenerated file is byte-identical to the committed one (a test checks this).

* Mini-ImageNet lists come from the canonical Ravi & Larochelle CSVs alone (no images
  needed): class = wnid, rank = row order of the image within its class in the CSV.
* glyphs lists come from the glyphs class list (names, splits) and its images per class.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List, Tuple

from .episodes import default_episode_path, generate_episode_list

PACKAGE_DATA = Path(__file__).resolve().parent
SETTINGS = [(5, 1), (5, 5)]  # (ways, shots)
QUERIES = 15
N_EPISODES = 600
SEED = 0
SPLITS = ("test", "val")


def miniimagenet_classes(split: str) -> Tuple[List[str], List[int]]:
    """Wnids of ``split`` in canonical order and their image counts, from the canonical CSVs."""
    order = json.loads((PACKAGE_DATA / "miniimagenet_split.json").read_text())[split]
    counts: Dict[str, int] = {}
    with (PACKAGE_DATA / "miniimagenet_ravi" / f"{split}.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            counts[row["label"]] = counts.get(row["label"], 0) + 1
    return list(order), [counts[w] for w in order]


def glyphs_classes(split: str) -> Tuple[List[str], List[int]]:
    """glyphs class names of ``split`` and images per class, at the default settings."""
    import inspect

    from .glyphs import load_glyphs, select_classes

    per_class = inspect.signature(load_glyphs).parameters["images_per_class"].default
    names = [g.name for g in select_classes() if g.split == split]  # store order within a split
    return names, [per_class] * len(names)


SOURCES = {"miniimagenet": miniimagenet_classes, "glyphs": glyphs_classes}


def make_committed_lists(datasets=("miniimagenet", "glyphs")) -> List[Path]:
    """(Re)write every committed list; returns the paths written."""
    written = []
    for dataset in datasets:
        for split in SPLITS:
            names, sizes = SOURCES[dataset](split)
            for ways, shots in SETTINGS:
                lst = generate_episode_list(dataset, names, sizes, split, ways, shots, QUERIES, N_EPISODES, SEED)
                path = default_episode_path(dataset, split, ways, shots, QUERIES, N_EPISODES, SEED)
                lst.save(path)
                written.append(path)
    return written
