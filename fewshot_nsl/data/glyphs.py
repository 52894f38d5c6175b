"""The embedded default dataset ``glyphs``: synthetic characters for offline runs.

With no Mini-ImageNet on disk the suite still runs, offline, on ``glyphs``: 100 classes
(one per character of the Latin, Greek, Cyrillic, Armenian and Georgian scripts, 20 per
script) rendered from the TrueType fonts shipped inside the matplotlib wheel (DejaVu
Sans / Serif / Sans Mono and STIXGeneral, four styles each), split 64/16/20 into
train/val/test classes like Mini-ImageNet.

Every image is drawn from its own generator ``np.random.default_rng([seed, c, i])``
(class index ``c`` in store order, rank ``i`` within the class), so generation is
byte-identical for a seed whatever the number of threads, and images within a class are
in rank order. Each image uses a random font among those whose cmap has the character,
with seeded affine (rotation, scale, aspect, shear, translation) and stroke variation,
random colours with a minimum contrast, a textured gradient background and clutter (a
faint second glyph, stray strokes, partial occlusion, blur, noise) so that 5-way
accuracies are not saturated.

The result is cached as an :class:`ImageStore` under
``<cache_dir>/glyphs-v<GLYPHS_VERSION>-s<seed>-n<images_per_class>-<image_size>`` and
memory-mapped on later calls; the fingerprint recorded in ``meta.json`` is checked on
every load and the store is regenerated (with a warning) if it does not match.

``glyphs`` is synthetic and labelled as such everywhere (``store.synthetic``,
``store.source``); its numbers are not comparable with Mini-ImageNet numbers.
"""
from __future__ import annotations

import functools
import os
import threading
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError, DataError
from ..registry import register_dataset
from .store import ImageStore, default_cache_dir

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
DISTRACTOR_FONTS: Tuple[str, ...] = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf")


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
def _charmaps() -> Dict[str, frozenset]:
    from matplotlib.ft2font import FT2Font

    return {f: frozenset(FT2Font(str(p)).get_charmap()) for f, p in font_paths().items()}


def fonts_covering(ch: str) -> Tuple[str, ...]:
    """Font files (in FONT_FILES order) whose cmap maps ``ch`` to a glyph."""
    cp = ord(ch)
    return tuple(f for f, cmap in _charmaps().items() if cp in cmap)


_local = threading.local()


def _font(name: str, size: int):
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

    font = _font(REFERENCE_FONT, 96)
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


def _similarity_matrix(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
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
    return float(_similarity_matrix([a], [b])[0, 0])


def too_similar(ch: str, chosen: Sequence[str], threshold: float = SIMILARITY_THRESHOLD) -> Optional[str]:
    """The first of ``chosen`` that ``ch`` renders nearly identically to, or None."""
    sims = _similarity_matrix([ch], list(chosen))[0]
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
    sims = _similarity_matrix(list(DISTRACTORS), chars).max(axis=1)
    return "".join(d for d, s in zip(DISTRACTORS, sims) if s < DISTRACTOR_THRESHOLD)


# ----------------------------------------------------------------------------- rendering

#: Rendering parameters (fractions of the image side unless noted). Part of GLYPHS_VERSION.
GLYPH_HEIGHT = (0.42, 0.72)  # longest side of the glyph's ink box
ROTATION_DEG = 20.0
SHEAR = 0.3
ASPECT = (0.8, 1.25)
TRANSLATION = 0.12
STROKE_WIDTH = (0, 2)  # PIL stroke_width at 84 px, scaled with the image size
THIN_PROB = 0.2  # erode the ink by one pixel (thinner strokes)
MIN_CONTRAST = 70.0  # luminance difference (0..255) between glyph and background
DISTRACTOR_GLYPH_PROB = 0.7
DISTRACTOR_GLYPH_HEIGHT = (0.2, 0.38)
DISTRACTOR_STROKES = (0, 3)  # number of stray lines / arcs
OCCLUSION_PROB = 0.4
OCCLUSION_SIZE = (0.15, 0.32)
BLUR_PROB = 0.35
NOISE_STD = (2.0, 10.0)
_REF_SIZE = 100
_SIZE_STEP = 1.12


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


@functools.lru_cache(maxsize=None)
def _ink_extent(font_name: str, ch: str) -> float:
    """Longest side of ``ch``'s box in ``font_name`` at ``_REF_SIZE`` points."""
    l, t, r, b = _font(font_name, _REF_SIZE).getbbox(ch)
    return float(max(r - l, b - t, 1))


def _glyph_mask(
    ch: str,
    font_name: str,
    height: float,
    stroke: int,
    size: int,
    angle: float,
    shear: float,
    aspect: float,
    center: Tuple[float, float],
) -> np.ndarray:
    """``ch`` drawn white on black, its ink box's longest side ``height`` px, transformed by
    rotation ``angle`` (degrees), ``shear`` and ``aspect`` and centred at ``center``;
    float32 ``(size, size)`` in 0..1."""
    from PIL import Image, ImageDraw

    # Point sizes on a geometric grid (few cached faces); the affine makes up the rest.
    exact = max(4.0, _REF_SIZE * height / _ink_extent(font_name, ch))
    points = int(round(4 * _SIZE_STEP ** np.floor(np.log(exact / 4) / np.log(_SIZE_STEP))))
    scale = exact / points
    font = _font(font_name, points)
    l, t, r, b = font.getbbox(ch, stroke_width=stroke)
    pad = 2
    w, h = r - l + 2 * pad, b - t + 2 * pad
    canvas = Image.new("L", (max(w, 1), max(h, 1)), 0)
    ImageDraw.Draw(canvas).text((pad - l, pad - t), ch, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    # forward map: output = c_out + R @ Sh @ A @ (input - c_in); PIL wants the inverse.
    th = np.deg2rad(angle)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    sh = np.array([[1.0, shear], [0.0, 1.0]])
    asp = np.diag([np.sqrt(aspect), 1.0 / np.sqrt(aspect)])
    inv = np.linalg.inv(scale * (rot @ sh @ asp))
    c_in = np.array([w / 2.0, h / 2.0])
    c_out = np.asarray(center, dtype=np.float64)
    off = c_in - inv @ c_out
    data = (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])
    out = canvas.transform((size, size), Image.AFFINE, data, resample=Image.BILINEAR, fillcolor=0)
    return np.asarray(out, dtype=np.float32) / 255.0


def _contrasting_colour(rng: np.random.Generator, against: Sequence[float], contrast: float) -> np.ndarray:
    """A random RGB colour whose luminance differs from every value in ``against`` by ``contrast``."""
    for _ in range(32):
        c = rng.uniform(0, 255, 3)
        lum = _luminance(c)
        if all(abs(lum - a) >= contrast for a in against):
            return c
    mean = float(np.mean(against))
    return np.full(3, 0.0 if mean > 127.5 else 255.0)


def _smooth_field(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise in ``[-1, 1]``, ``(size, size, channels)`` float32."""
    from PIL import Image

    small = rng.uniform(0, 255, (cells, cells, channels)).astype(np.uint8)
    mode = "RGB" if channels == 3 else "L"
    img = Image.fromarray(small if channels == 3 else small[..., 0], mode).resize((size, size), Image.BICUBIC)
    a = np.asarray(img, dtype=np.float32).reshape(size, size, channels)
    return a / 127.5 - 1.0


def _composite(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    a = alpha[..., None]
    img *= 1.0 - a
    img += a * colour


def render_image(glyph: GlyphClass, rng: np.random.Generator, size: int = 84) -> np.ndarray:
    """One image of ``glyph``: ``uint8 (size, size, 3)``, drawn entirely from ``rng``."""
    from PIL import Image, ImageDraw, ImageFilter

    k = size / 84.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)

    # Background: two-colour linear gradient plus low-frequency colour texture.
    c1 = rng.uniform(0, 255, 3)
    c2 = np.clip(c1 + rng.normal(0, 45, 3), 0, 255)
    phi = rng.uniform(0, 2 * np.pi)
    t = np.cos(phi) * xx + np.sin(phi) * yy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    img += _smooth_field(rng, size, int(rng.integers(3, 9)), 3) * rng.uniform(5, 30)
    img = img.astype(np.float32)
    bg_lums = [float(_luminance(c1)), float(_luminance(c2))]

    fg = _contrasting_colour(rng, bg_lums, MIN_CONTRAST)

    # Clutter behind the glyph: stray lines / arcs.
    n_strokes = int(rng.integers(DISTRACTOR_STROKES[0], DISTRACTOR_STROKES[1] + 1))
    for _ in range(n_strokes):
        layer = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(layer)
        width = max(1, int(round(rng.uniform(1, 3.5) * k)))
        p = rng.uniform(-0.1, 1.1, 4) * size
        if rng.random() < 0.5:
            draw.line([(p[0], p[1]), (p[2], p[3])], fill=255, width=width)
        else:
            box = [min(p[0], p[2]), min(p[1], p[3]), max(p[0], p[2]) + 4, max(p[1], p[3]) + 4]
            a0 = rng.uniform(0, 360)
            draw.arc(box, a0, a0 + rng.uniform(60, 270), fill=255, width=width)
        colour = fg if rng.random() < 0.5 else _contrasting_colour(rng, bg_lums, 30.0)
        _composite(img, np.asarray(layer, np.float32) / 255.0 * rng.uniform(0.3, 0.8), colour)

    # Clutter: a second, smaller and fainter glyph (digit or symbol, never a class).
    if rng.random() < DISTRACTOR_GLYPH_PROB:
        pool = distractor_chars()
        ch = pool[int(rng.integers(len(pool)))]
        fonts = [f for f in DISTRACTOR_FONTS if ord(ch) in _charmaps()[f]]
        font_name = fonts[int(rng.integers(len(fonts)))]
        mask = _glyph_mask(
            ch, font_name, rng.uniform(*DISTRACTOR_GLYPH_HEIGHT) * size, 0, size,
            rng.uniform(-45, 45), 0.0, 1.0, tuple(rng.uniform(0.1, 0.9, 2) * size),
        )
        colour = fg if rng.random() < 0.5 else _contrasting_colour(rng, bg_lums, 40.0)
        _composite(img, mask * rng.uniform(0.35, 0.75), colour)

    # The glyph itself.
    font_name = glyph.fonts[int(rng.integers(len(glyph.fonts)))]
    height = rng.uniform(*GLYPH_HEIGHT) * size
    stroke = int(round(rng.integers(STROKE_WIDTH[0], STROKE_WIDTH[1] + 1) * k))
    center = size / 2.0 + rng.uniform(-TRANSLATION, TRANSLATION, 2) * size
    mask = _glyph_mask(
        glyph.char, font_name, height, stroke, size,
        rng.uniform(-ROTATION_DEG, ROTATION_DEG), rng.uniform(-SHEAR, SHEAR),
        float(np.exp(rng.uniform(np.log(ASPECT[0]), np.log(ASPECT[1])))), tuple(center),
    )
    if rng.random() < THIN_PROB and stroke == 0 and height > 24:
        thin = Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.MinFilter(3))
        mask = np.asarray(thin, np.float32) / 255.0
    ink = 1.0 - rng.uniform(0, 0.35) * (0.5 + 0.5 * _smooth_field(rng, size, 4, 1)[..., 0])  # uneven ink
    _composite(img, mask * ink, fg)

    # Partial occlusion by a rectangle or ellipse near the glyph.
    if rng.random() < OCCLUSION_PROB:
        layer = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(layer)
        w, h = rng.uniform(*OCCLUSION_SIZE, 2) * size
        cx, cy = center + rng.uniform(-0.25, 0.25, 2) * height
        box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=255)
        colour = c1 + (c2 - c1) * rng.random() if rng.random() < 0.6 else rng.uniform(0, 255, 3)
        _composite(img, np.asarray(layer, np.float32) / 255.0, colour)

    # Camera: blur and sensor noise.
    img += rng.normal(0, rng.uniform(*NOISE_STD), img.shape).astype(np.float32)
    out = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < BLUR_PROB:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0) * k))
    return np.asarray(out, dtype=np.uint8)


def render_class(c: int, glyph: GlyphClass, seed: int, n: int, size: int) -> np.ndarray:
    """Images ``0..n-1`` of class ``c`` (store order), ``uint8 (n, size, size, 3)``;
    image ``i`` is drawn from ``np.random.default_rng([seed, c, i])``."""
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        out[i] = render_image(glyph, np.random.default_rng([seed, c, i]), size)
    return out


def _workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def generate_glyphs(
    seed: int = 0, images_per_class: int = 80, image_size: int = 84, workers: Optional[int] = None
) -> ImageStore:
    """Render the whole dataset in memory (no cache). Byte-identical for a given seed
    whatever ``workers`` (threads over classes; default min(4, cpu count))."""
    classes = select_classes()
    distractor_chars()  # computed once here rather than racing in the threads
    n, size = images_per_class, image_size
    images = np.empty((len(classes) * n, size, size, 3), np.uint8)
    workers = workers or _workers()

    def job(c: int) -> None:
        images[c * n: (c + 1) * n] = render_class(c, classes[c], seed, n, size)

    # Always in pool threads: their font caches go away with them.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(job, range(len(classes))))
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), n)
    return ImageStore(
        NAME,
        images,
        labels,
        [g.name for g in classes],
        [g.split for g in classes],
        synthetic=True,
        source=SOURCE,
    )


def render_preview(path, n_classes: int = 10, per_class: int = 8, seed: int = 0, image_size: int = 84) -> Path:
    """Write a PNG grid (256-colour palette) of ``per_class`` samples (columns) of
    ``n_classes`` classes (rows, spread over the scripts) to ``path``, e.g. for the README;
    the images are exactly those of the store for ``seed`` (ranks ``0..per_class-1``).
    Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    classes = select_classes()
    order = sorted(range(len(classes)), key=lambda c: (SCRIPTS.index(classes[c].script), c))
    picks = [order[int(j)] for j in np.linspace(0, len(order) - 1, n_classes).round()]
    fig = Figure(figsize=(per_class * 0.9 + 1.9, n_classes * 0.9 + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_classes, per_class, squeeze=False)
    for row, c in enumerate(picks):
        imgs = render_class(c, classes[c], seed, per_class, image_size)
        for col in range(per_class):
            ax = axes[row][col]
            ax.imshow(imgs[col], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                label = f"{classes[c].name}\n({classes[c].split})"
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"glyphs v{GLYPHS_VERSION} (synthetic; seed {seed})", fontsize=9)
    fig.subplots_adjust(left=0.21, right=0.99, bottom=0.01, top=0.95, wspace=0.05, hspace=0.05)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    canvas = fig.canvas
    canvas.draw()
    rgb = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
    # 256-colour palette: the sensor noise makes a true-colour PNG ~1.3 MB, this ~0.2 MB.
    rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, format="PNG", optimize=True)
    return path


# ----------------------------------------------------------------------------- cached store


def cache_name(seed: int, images_per_class: int, image_size: int) -> str:
    """Cache folder name, e.g. ``glyphs-v1-s0-n80-84``."""
    return f"glyphs-v{GLYPHS_VERSION}-s{seed}-n{images_per_class}-{image_size}"


def _check_cached(store: ImageStore, images_per_class: int, image_size: int) -> Optional[str]:
    """Why a cached store cannot be used, or None if it matches and its bytes check out."""
    classes = select_classes()
    if store.name != NAME or not store.synthetic:
        return f"is not a synthetic '{NAME}' store"
    if store.class_names != [g.name for g in classes] or store.class_splits != [g.split for g in classes]:
        return "has other classes or splits than this version selects"
    if tuple(store.images.shape) != (len(classes) * images_per_class, image_size, image_size, 3):
        return f"has images of shape {tuple(store.images.shape)}"
    if not np.array_equal(store.labels, np.repeat(np.arange(len(classes)), images_per_class)):
        return "has unexpected labels"
    recorded = store._fingerprint
    store._fingerprint = None  # recompute from the bytes on disk
    actual = store.fingerprint()
    if recorded != actual:
        return f"fails its checksum (meta.json records {recorded}, the files hash to {actual})"
    return None


@register_dataset(NAME)
def load_glyphs(
    data_root: Optional[str] = None,
    cache_dir: Optional[str] = None,
    image_size: int = 84,
    images_per_class: int = 80,
    seed: int = 0,
) -> ImageStore:
    """The embedded synthetic dataset: 100 character classes (64/16/20), RGB ``image_size``.

    Generated on first use (seconds) and cached under
    ``cache_dir/glyphs-v<GLYPHS_VERSION>-s<seed>-n<images_per_class>-<image_size>``
    (``cache_dir`` defaults to ``default_cache_dir()/"stores"``); later calls memory-map
    the cache after checking its fingerprint, and regenerate it with a warning if the check
    fails. ``data_root`` is accepted (the CLI passes it to every dataset) and ignored.
    """
    del data_root  # glyphs needs no data on disk
    checks = (("image_size", image_size, 16), ("images_per_class", images_per_class, 1), ("seed", seed, 0))
    for arg, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(f"glyphs: {arg} must be an integer >= {low}, got {value!r}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "stores"
    directory = root / cache_name(int(seed), int(images_per_class), int(image_size))
    if ImageStore.is_cached(directory):
        try:
            store = ImageStore.load(directory)
            problem = _check_cached(store, images_per_class, image_size)
        except Exception as exc:  # unreadable or truncated cache: regenerate
            problem = f"cannot be read ({type(exc).__name__}: {exc})"
        if problem is None:
            return store
        warnings.warn(f"glyphs: cached store {directory} {problem}; regenerating it", stacklevel=2)
    store = generate_glyphs(int(seed), int(images_per_class), int(image_size))
    try:
        store.save(directory)
    except OSError as exc:
        import shutil

        shutil.rmtree(directory.with_name(directory.name + f".tmp{os.getpid()}"), ignore_errors=True)
        if ImageStore.is_cached(directory):  # another process wrote it concurrently
            return ImageStore.load(directory)
        warnings.warn(f"glyphs: cannot write the cache {directory} ({exc}); using the store in memory", stacklevel=2)
        return store
    return ImageStore.load(directory)
