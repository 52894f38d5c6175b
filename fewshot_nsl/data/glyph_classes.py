"""Classes of the embedded ``glyphs`` dataset: the fonts, the candidate characters, the look-alike checks
and the deterministic choice of the 100 classes and their 64/16/20 split.

100 classes, one per character of the Latin, Greek, Cyrillic, Armenian and Georgian scripts (20 per
script), from the TrueType fonts shipped inside the matplotlib wheel (DejaVu Sans / Serif / Sans Mono
and STIXGeneral, four styles each). Characters listed in :data:`CONFUSABLES`, covered by fewer than
:data:`MIN_FONTS` fonts, or rendering nearly like an earlier class (:func:`too_similar`) are dropped.
Drawing the images is :mod:`fewshot_nsl.data.glyph_render`; the registered, cached dataset is
:mod:`fewshot_nsl.data.glyphs`.
"""
from __future__ import annotations

import functools
import threading
import unicodedata
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..errors import DataError

#: Bump whenever class selection or rendering changes; part of the cache folder name.
GLYPHS_VERSION = 1
NAME = "glyphs"
SOURCE = (
    f"glyphs v{GLYPHS_VERSION} (synthetic characters rendered from matplotlib's bundled fonts; "
    "not comparable with Mini-ImageNet numbers)"
)

SCRIPTS: Tuple[str, ...] = ("latin", "greek", "cyrillic", "armenian", "georgian")
CLASSES_PER_SCRIPT = 20
#: Classes per split, as in Mini-ImageNet (Ravi & Larochelle).
SPLIT_SIZES: Dict[str, int] = {"train": 64, "val": 16, "test": 20}
#: A character becomes a class only if at least this many fonts have it in their cmap.
MIN_FONTS = 4
#: The class split is part of the task definition, so it is fixed (not the image seed).
SPLIT_SEED = 2019
#: Classes of each split per script (in SCRIPTS order); each script has 20 classes.
SPLIT_QUOTAS: Dict[str, Tuple[int, ...]] = {
    "train": (13, 13, 13, 13, 12),
    "val": (3, 3, 3, 3, 4),
    "test": (4, 4, 4, 4, 4),
}

#: Font files (in ``matplotlib.get_data_path()/fonts/ttf``): DejaVu Sans, Serif and Sans
#: Mono and STIXGeneral, four styles each. LastResort, the *Display* faces, the cm* (TeX)
#: faces and STIXSiz*/STIXNonUni* are deliberately not used.
FONT_FILES: Tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)
#: Font used for the look-alike check (it covers every candidate).
REFERENCE_FONT = "DejaVuSans.ttf"

#: Candidate code-point ranges per script (inclusive); only letters without a canonical
#: decomposition (no accented variants) are candidates.
SCRIPT_RANGES: Dict[str, Tuple[Tuple[int, int], ...]] = {
    "latin": ((0x41, 0x5A), (0x61, 0x7A)),
    "greek": ((0x391, 0x3A9), (0x3B1, 0x3C9)),
    "cyrillic": ((0x400, 0x42F), (0x430, 0x45F)),
    "armenian": ((0x531, 0x556), (0x561, 0x586)),
    "georgian": ((0x10A0, 0x10C5), (0x10D0, 0x10F0)),
}

#: Explicit confusables never used as classes: ``{characters: what they look like}``.
#: Scripts are taken in the order of SCRIPTS, so a homoglyph of an earlier script's letter
#: (or of a digit, which appear as clutter) is excluded here; a programmatic check
#: (:func:`too_similar`) then drops whatever still renders nearly identically.
CONFUSABLES: Dict[str, str] = {
    # Latin: digits and case pairs that differ only in size.
    "Il": "digit 1 / vertical bar",
    "o": "digit 0 / Latin O",
    "cosvwxz": "their capitals (same shape, smaller)",
    # Greek capitals identical to Latin ones, small letters like Latin ones.
    "ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ": "Latin A B E Z H I K M N O P T Y X",
    "οινρκχυγ": "Latin o i v p k x u y",
    # Cyrillic homoglyphs of Latin and Greek, digit-like and small-caps lowercase.
    "АВЕКМНОРСТХ": "Latin A B E K M N O P C T X",
    "аеорсухѕіј": "Latin a e o p c y x s i j",
    "ЅІЈУ": "Latin S I J Y",
    "ГПФ": "Greek Gamma Pi Phi",
    "Зз": "digit 3",
    "вгджзиклмнптфцчшщъыьэюяєљњџ": "their capitals (small-caps shapes) or Greek phi",
    # Armenian letters shaped like Latin ones.
    "ՕօՍսՏոհցզԼւյՈ": "Latin O o U u S n h g q L l j n",
    "Փ": "Greek Phi",
}
_CONFUSABLE_SET = frozenset("".join(CONFUSABLES))
#: Two renders whose tolerant overlap F-score (see :func:`shape_similarity`) reaches this are look-alikes.
SIMILARITY_THRESHOLD = 0.95

#: Candidate clutter glyphs (never classes): digits and symbols; those that look like a
#: class character (see :func:`distractor_chars`) are not used.
DISTRACTORS = "0123456789#$%&@?!+*=<>§¶∞√∑∫≈≠±÷×†‡©®♠♣♥♦★☆✓✗→←↑↓◆●▲■□○"
#: A clutter glyph at least this similar to a class character is not used.
DISTRACTOR_THRESHOLD = 0.85


class GlyphClass(NamedTuple):
    """One class: its character, name, script, split and the fonts that have the character."""

    char: str
    name: str
    script: str
    split: str
    fonts: Tuple[str, ...]


# ----------------------------------------------------------------------------- fonts


def font_dir() -> Path:
    """``matplotlib.get_data_path()/fonts/ttf``."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_paths() -> Dict[str, Path]:
    """The font files used, ``{file name: path}``; missing files are refused."""
    d = font_dir()
    paths = {f: d / f for f in FONT_FILES}
    missing = [f for f, p in paths.items() if not p.is_file()]
    if missing:
        raise DataError(
            f"glyphs: font file(s) {', '.join(missing)} not found in {d}; reinstall matplotlib "
            f"(pip install --force-reinstall matplotlib)"
        )
    return paths


@functools.lru_cache(maxsize=None)
def charmaps() -> Dict[str, frozenset]:
    from matplotlib.ft2font import FT2Font

    return {f: frozenset(FT2Font(str(p)).get_charmap()) for f, p in font_paths().items()}


def fonts_covering(ch: str) -> Tuple[str, ...]:
    """Font files (in FONT_FILES order) whose cmap maps ``ch`` to a glyph."""
    cp = ord(ch)
    return tuple(f for f, cmap in charmaps().items() if cp in cmap)


_local = threading.local()


def load_font(name: str, size: int):
    """A PIL FreeType font, cached per thread (FreeType faces are not thread-safe)."""
    from PIL import ImageFont

    cache = getattr(_local, "fonts", None)
    if cache is None:
        cache = _local.fonts = {}
    key = (name, size)
    font = cache.get(key)
    if font is None:
        font = ImageFont.truetype(str(font_dir() / name), size, layout_engine=ImageFont.Layout.BASIC)
        cache[key] = font
    return font


# ----------------------------------------------------------------------------- class selection


def class_name(ch: str, script: str) -> str:
    """ASCII-safe class name built from the Unicode name, unique even ignoring case:
    ``latin_R``, ``greek_lambda``, ``greek_capital_sigma``, ``cyrillic_small_letter_zhe``,
    ``georgian_capital_letter_an``."""
    uname = unicodedata.name(ch)
    if script == "latin":
        return f"latin_{ch}"
    prefix = script.upper() + " "
    rest = uname[len(prefix):] if uname.startswith(prefix) else uname
    if script == "greek":
        # GREEK SMALL LETTER LAMDA -> greek_lambda, GREEK CAPITAL LETTER SIGMA -> greek_capital_sigma
        letter = rest.split("LETTER ", 1)[-1].lower().replace("lamda", "lambda")
        rest = ("capital " if rest.startswith("CAPITAL") else "") + letter
    return f"{script}_" + "".join(c if c.isalnum() else "_" for c in rest.lower())


def _candidates(script: str) -> List[str]:
    """Candidate letters of a script in a fixed order: each capital followed by its small letter."""
    chars = [
        chr(cp)
        for lo, hi in SCRIPT_RANGES[script]
        for cp in range(lo, hi + 1)
        if unicodedata.category(chr(cp)) in ("Lu", "Ll", "Lo") and not unicodedata.decomposition(chr(cp))
    ]
    names = {unicodedata.name(c): c for c in chars}
    order: List[str] = []
    for c in chars:
        if c in order:
            continue
        order.append(c)
        uname = unicodedata.name(c)
        if "CAPITAL LETTER" in uname:
            for small in (uname.replace("CAPITAL LETTER", "SMALL LETTER"), uname.replace("CAPITAL LETTER", "LETTER")):
                if small in names and names[small] not in order:
                    order.append(names[small])
                    break
    return order


@functools.lru_cache(maxsize=4096)
def normalized_render(ch: str, size: int = 32) -> np.ndarray:
    """``ch`` in DejaVu Sans, cropped to its ink, centred in a square and resized to
    ``size`` x ``size``; a bool array (ink = True)."""
    from PIL import Image, ImageDraw

    font = load_font(REFERENCE_FONT, 96)
    canvas = Image.new("L", (240, 240), 0)
    ImageDraw.Draw(canvas).text((120, 120), ch, fill=255, font=font, anchor="mm")
    a = np.asarray(canvas)
    ys, xs = np.nonzero(a > 127)
    if len(ys) == 0:
        return np.zeros((size, size), bool)
    a = a[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h, w = a.shape
    s = max(h, w)
    sq = np.zeros((s, s), np.uint8)
    sq[(s - h) // 2: (s - h) // 2 + h, (s - w) // 2: (s - w) // 2 + w] = a
    return np.asarray(Image.fromarray(sq).resize((size, size), Image.LANCZOS)) > 127


def _dilate(a: np.ndarray) -> np.ndarray:
    """3x3 binary dilation of the last two axes."""
    h, w = a.shape[-2:]
    p = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(1, 1), (1, 1)])
    out = np.zeros_like(a)
    for dy in range(3):
        for dx in range(3):
            out |= p[..., dy: dy + h, dx: dx + w]
    return out


def similarity_matrix(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """``shape_similarity`` of every character of ``a`` with every one of ``b``, ``(len(a), len(b))``."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    A = np.stack([normalized_render(c) for c in a])
    B = np.stack([normalized_render(c) for c in b])
    Ad = _dilate(A).reshape(len(a), -1).astype(np.float32)
    Bd = _dilate(B).reshape(len(b), -1).astype(np.float32)
    Af = A.reshape(len(a), -1).astype(np.float32)
    Bf = B.reshape(len(b), -1).astype(np.float32)
    precision = (Af @ Bd.T) / np.maximum(Af.sum(1), 1)[:, None]
    recall = (Ad @ Bf.T) / np.maximum(Bf.sum(1), 1)[None, :]
    return 2 * precision * recall / np.maximum(precision + recall, 1e-9)


def shape_similarity(a: str, b: str) -> float:
    """Overlap F-score of two normalised renders with a 1-pixel tolerance (1.0 = same shape).

    Tolerant to the size and stroke-weight differences between e.g. ``C`` and ``c`` (0.99+),
    while distinct letters such as Cyrillic Be / Ve or Greek Delta / Lamda stay below 0.95.
    """
    return float(similarity_matrix([a], [b])[0, 0])


def too_similar(ch: str, chosen: Sequence[str], threshold: float = SIMILARITY_THRESHOLD) -> Optional[str]:
    """The first of ``chosen`` that ``ch`` renders nearly identically to, or None."""
    sims = similarity_matrix([ch], list(chosen))[0]
    hits = np.nonzero(sims >= threshold)[0]
    return chosen[int(hits[0])] if len(hits) else None


@functools.lru_cache(maxsize=1)
def select_classes() -> Tuple[GlyphClass, ...]:
    """The 100 classes, deterministic: 20 per script, train classes first, then val, test.

    Per script, candidates are taken in a fixed order (each capital then its small letter)
    and dropped if listed in CONFUSABLES, covered by fewer than MIN_FONTS fonts, or nearly
    identical in DejaVu Sans to a surviving candidate of this or an earlier script; 20 are
    then picked evenly spaced over the survivors (spanning the alphabet). Splits are drawn
    per script from a permutation seeded with SPLIT_SEED, so each split mixes all scripts
    (64 = 13+13+13+13+12, 16 = 3+3+3+3+4, 20 = 4 per script).
    """
    survivors: List[str] = []
    per_script: Dict[str, List[str]] = {}
    for script in SCRIPTS:
        kept = []
        for ch in _candidates(script):
            if ch in _CONFUSABLE_SET or len(fonts_covering(ch)) < MIN_FONTS:
                continue
            if too_similar(ch, survivors) is not None:
                continue
            survivors.append(ch)
            kept.append(ch)
        if len(kept) < CLASSES_PER_SCRIPT:
            raise DataError(
                f"glyphs: only {len(kept)} usable {script} characters in matplotlib's fonts "
                f"({font_dir()}), need {CLASSES_PER_SCRIPT}; reinstall matplotlib"
            )
        idx = np.round(np.linspace(0, len(kept) - 1, CLASSES_PER_SCRIPT)).astype(int)
        per_script[script] = [kept[i] for i in idx]

    rng = np.random.default_rng(SPLIT_SEED)
    by_split: Dict[str, List[GlyphClass]] = {s: [] for s in SPLIT_SIZES}
    for k, script in enumerate(SCRIPTS):
        chars = per_script[script]
        perm = rng.permutation(len(chars))
        labels = [s for s in SPLIT_SIZES for _ in range(SPLIT_QUOTAS[s][k])]
        assert len(labels) == len(chars) == CLASSES_PER_SCRIPT
        split_of = {int(p): labels[j] for j, p in enumerate(perm)}
        for j, ch in enumerate(chars):  # keep the script order within each split
            by_split[split_of[j]].append(
                GlyphClass(ch, class_name(ch, script), script, split_of[j], fonts_covering(ch))
            )
    return tuple(by_split["train"] + by_split["val"] + by_split["test"])


@functools.lru_cache(maxsize=1)
def distractor_chars() -> str:
    """The clutter glyphs actually used: DISTRACTORS minus those resembling a class
    character (e.g. the digit 8 and Greek theta, the n-ary sum and Greek Sigma)."""
    chars = [g.char for g in select_classes()]
    sims = similarity_matrix(list(DISTRACTORS), chars).max(axis=1)
    return "".join(d for d, s in zip(DISTRACTORS, sims) if s < DISTRACTOR_THRESHOLD)
