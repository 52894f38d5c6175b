"""Drawing the ``glyphs`` images: one seeded image of a class (:func:`render_image`), a class, the whole
store in memory (:func:`generate_glyphs`) and a preview grid (:func:`render_preview`).

Every image is drawn from its own generator ``np.random.default_rng([seed, c, i])`` (class index ``c``
in store order, rank ``i`` within the class), so generation is byte-identical for a seed whatever the
number of threads. Each image uses a random font among those whose cmap has the character, with seeded
affine (rotation, scale, aspect, shear, translation) and stroke variation, random colours with a minimum
contrast, a textured gradient background and clutter (a faint second glyph, stray strokes, partial
occlusion, blur, noise) so that 5-way accuracies are not saturated.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from .glyph_classes import (
    GLYPHS_VERSION,
    NAME,
    SCRIPTS,
    SOURCE,
    GlyphClass,
    charmaps,
    distractor_chars,
    load_font,
    select_classes,
)
from .store import ImageStore

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
DISTRACTOR_FONTS: Tuple[str, ...] = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf")
_REF_SIZE = 100
_SIZE_STEP = 1.12


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


@functools.lru_cache(maxsize=None)
def _ink_extent(font_name: str, ch: str) -> float:
    """Longest side of ``ch``'s box in ``font_name`` at ``_REF_SIZE`` points."""
    l, t, r, b = load_font(font_name, _REF_SIZE).getbbox(ch)
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
    font = load_font(font_name, points)
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
        fonts = [f for f in DISTRACTOR_FONTS if ord(ch) in charmaps()[f]]
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
