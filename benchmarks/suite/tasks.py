"""The suite's twelve image classification tasks and their domain shifts, built offline and deterministically.

Twelve tasks, so that merging many models (and gating between them) is tried
on tasks that differ in content *and* in look: each has its own backgrounds
and colour statistics, so a small gate can tell which task an image comes
from. Every image is :data:`IMAGE_SIZE` px RGB.

Real images, from what installed packages ship (nothing is downloaded):

- ``digits``: scikit-learn's handwritten digits (8x8, upscaled);
- ``animals``: the animal silhouettes of ``animal-shape-mnist`` (28x28, MIT), read
  straight from the files in its wheel (its own loader imports TensorFlow);
- ``textures``: grey crops of scikit-image's sample photos (brick, grass, gravel,
  ...; CC0 or public domain), the label being the photo;
- ``scenes``: colour crops of scikit-image's photos and scikit-learn's two
  (``china.jpg``, ``flower.jpg``; CC BY 2.0), the label being the photo.

Rendered: ``shapes``, ``counting`` (dots), ``orientation`` (gratings),
``patterns``, ``colours``, ``letters`` and ``symbols`` (glyphs of Pillow's
built-in scalable font, Aileron) and ``arrows``, each with random position,
scale, colour and background.

Splits never share an image: a rendered image is drawn from a random generator
seeded by (task, split, label, index), so the three splits use distinct seeds;
the real sets are partitioned (a digit or a silhouette is in one split only);
the crop tasks cut every photo into square blocks and give each block to one
split (a quarter of them to test), so no pixel of a test crop was seen in
training.

Seeds come from the task's name (a SHA-256), never from a global random state,
so ``build_task`` gives the same rows, images and parquet bytes for the same
arguments (on one machine: a different CPU's float maths may move a rare pixel
by one level). Rows are in round-robin order of the labels.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

if TYPE_CHECKING:
    import datasets

    from benchmarks.suite.bench import Bench

VERSION = 1
"""Bump when any generator changes: it is part of every dataset's cache key."""

IMAGE_SIZE = 32
SPLITS = ("train", "validation", "test")
SHIFTS: tuple[str, ...] = ("colour", "noise", "blur", "sketch", "inverted")

_CENTRE = IMAGE_SIZE / 2

_SUPER = 4
"""Shapes and glyphs are drawn at 4x and reduced by box filtering: anti-aliased edges."""

_BLOCK = 0.25
"""The crop tasks cut photos into square blocks of this fraction of their shorter side (see :func:`_blocks`)."""


# -- the registry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Task:
    """A task: its label names, a one-line description, and how to make one image.

    ``render(rng, label, split)`` makes one float image (IMAGE_SIZE, IMAGE_SIZE, 3)
    in [0, 255]; a real image set also has ``pool`` (label -> all its source
    images) and its ``render`` gets a pool image in place of the label.
    """

    name: str
    labels: tuple[str, ...]
    description: str
    render: Callable[..., np.ndarray]
    pool: Callable[[int], np.ndarray] | None = None


_REGISTRY: dict[str, _Task] = {}


def _register(name: str, labels: list[str] | tuple[str, ...], description: str,
              pool: Callable[[int], np.ndarray] | None = None) -> Callable[[Callable[..., np.ndarray]], Callable]:
    def add(render: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        if name in _REGISTRY:
            raise ValueError(f"task {name!r} is registered twice")
        _REGISTRY[name] = _Task(name, tuple(labels), description, render, pool)
        return render
    return add


def _seed(*parts: object) -> int:
    """A stable 63-bit seed from ``parts`` (their text), the same in every process and on every machine."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# -- small drawing helpers ------------------------------------------------------------------------
def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each (IMAGE_SIZE, IMAGE_SIZE)."""
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64) + 0.5
    return ys, xs


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A black supersampled mask to draw on in white."""
    mask = Image.new("L", (IMAGE_SIZE * _SUPER, IMAGE_SIZE * _SUPER), 0)
    return mask, ImageDraw.Draw(mask)


def _alpha(mask: Image.Image) -> np.ndarray:
    """A supersampled mask reduced to IMAGE_SIZE, as (IMAGE_SIZE, IMAGE_SIZE, 1) floats in [0, 1]."""
    small = mask.reduce(_SUPER) if mask.size[0] != IMAGE_SIZE else mask
    return (np.asarray(small, dtype=np.float64) / 255.0)[..., None]


def _composite(background: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return background * (1.0 - alpha) + np.asarray(colour, dtype=np.float64) * alpha


def _flat(rng: np.random.Generator, colour: np.ndarray, noise: float) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, np.float64), (IMAGE_SIZE, IMAGE_SIZE, 3)) + rng.normal(
        0.0, noise, (IMAGE_SIZE, IMAGE_SIZE, 1))


def _clouds(rng: np.random.Generator, cells: int) -> np.ndarray:
    """Smooth random noise in [0, 1] (IMAGE_SIZE, IMAGE_SIZE): a ``cells`` x ``cells`` grid, bicubic-upscaled."""
    coarse = Image.fromarray(rng.random((cells, cells)).astype(np.float32))
    smooth = np.asarray(coarse.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), dtype=np.float64)
    low, high = smooth.min(), smooth.max()
    return (smooth - low) / max(high - low, 1e-6)


def _gradient(rng: np.random.Generator, top: np.ndarray, bottom: np.ndarray, tilt: float = 0.3) -> np.ndarray:
    """A linear gradient from ``top`` to ``bottom``, its direction tilted at random by up to ``tilt`` rad."""
    ys, xs = _grid()
    angle = rng.uniform(-tilt, tilt)
    t = ((ys - _CENTRE) * math.cos(angle) + (xs - _CENTRE) * math.sin(angle)) / IMAGE_SIZE + 0.5
    t = np.clip(t, 0.0, 1.0)[..., None]
    return np.asarray(top, np.float64) * (1 - t) + np.asarray(bottom, np.float64) * t


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    """An RGB colour in [0, 255] from hue in degrees, saturation and value in [0, 1]."""
    import colorsys

    return np.array(colorsys.hsv_to_rgb((hue % 360) / 360.0, saturation, value)) * 255.0


def _random_colour(rng: np.random.Generator, avoid: np.ndarray | None = None,
                   min_distance: float = 120.0) -> np.ndarray:
    """A random saturated-ish colour at least ``min_distance`` (RGB, Euclidean) from ``avoid``."""
    for _ in range(50):
        colour = _hsv(rng.uniform(0, 360), rng.uniform(0.3, 1.0), rng.uniform(0.25, 1.0))
        if avoid is None or np.linalg.norm(colour - avoid) >= min_distance:
            return colour
    return 255.0 - np.asarray(avoid, np.float64)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _polygon(draw: ImageDraw.ImageDraw, points: np.ndarray, centre: tuple[float, float], fill: int = 255) -> None:
    """Draw ``points`` (IMAGE_SIZE px units, relative to ``centre``) on a supersampled canvas."""
    xy = (points + np.asarray(centre)) * _SUPER
    draw.polygon([tuple(p) for p in xy.tolist()], fill=fill)


def _disc(draw: ImageDraw.ImageDraw, cx: float, cy: float, radius: float, fill: int = 255) -> None:
    s = _SUPER
    draw.ellipse([(cx - radius) * s, (cy - radius) * s, (cx + radius) * s, (cy + radius) * s], fill=fill)


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in scalable font (Aileron, Pillow >= 10.1 with FreeType) at ``size`` px."""
    return ImageFont.load_default(size=size)


@functools.cache
def _glyph(text: str, size: int, stroke: int) -> Image.Image:
    """``text`` at ``size`` px (stroke ``stroke`` px at 4x) centred on a 2x canvas, white on black; cached."""
    mask, draw = _canvas()
    half = IMAGE_SIZE * _SUPER / 2
    draw.text((half, half), text, fill=255, font=_font(size * _SUPER), anchor="mm", stroke_width=stroke,
              stroke_fill=255)
    return mask.reduce(_SUPER // 2)


def _glyph_alpha(rng: np.random.Generator, text: str, size: tuple[int, int], max_angle: float) -> np.ndarray:
    """``text`` at a size in ``size`` (px), weight, place and rotation (up to ``max_angle`` degrees) at random.

    The glyph is drawn once per (text, size, weight), then moved (up to 2 px)
    and rotated at 2x: a tenth of the cost of drawing and rotating at 4x.
    """
    height = int(rng.integers(size[0], size[1] + 1))
    glyph = _glyph(text, height, int(rng.integers(0, 3)) * _SUPER // 2)
    slack = 2 * 2  # +-2 px, at 2x
    moved = glyph.rotate(rng.uniform(-max_angle, max_angle), resample=Image.BILINEAR,
                         translate=(rng.uniform(-slack, slack), rng.uniform(-slack, slack)))
    return _alpha(moved.reduce(2))


# -- photos ---------------------------------------------------------------------------------------
@functools.cache
def _photo(name: str) -> Image.Image:
    """A sample photo an installed package ships, as a PIL image (``L`` for grey photos, else ``RGB``)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(f"{name}.jpg"))
    import skimage.data

    array = getattr(skimage.data, name)()
    if array.ndim == 3:
        return Image.fromarray(np.ascontiguousarray(array[..., :3]))
    return Image.fromarray(array)


@functools.cache
def _blocks(name: str, split: int) -> tuple[tuple[int, int], ...]:
    """The top-left corners of the photo's square blocks that belong to ``split``.

    A photo is cut into a grid of blocks, :data:`_BLOCK` of its shorter side
    each; a seeded shuffle gives 25 % of them to test, 15 % to validation and
    the rest to train. A crop lies inside one block, so the splits share no
    pixel, yet each split sees every part of the photo.
    """
    width, height = _photo(name).size
    side = int(min(width, height) * _BLOCK)
    corners = [(x * side, y * side) for y in range(height // side) for x in range(width // side)]
    order = np.random.default_rng(_seed("blocks", name)).permutation(len(corners))
    n_test, n_val = max(1, round(len(corners) * 0.25)), max(1, round(len(corners) * 0.15))
    chosen = {2: order[:n_test], 1: order[n_test:n_test + n_val], 0: order[n_test + n_val:]}[split]
    return tuple(corners[i] for i in sorted(chosen))


def _block_crop(rng: np.random.Generator, name: str, split: int, fraction: tuple[float, float] = (0.5, 1.0)
                ) -> np.ndarray:
    """A random square crop inside one of ``split``'s blocks of the photo, resized to IMAGE_SIZE, maybe flipped.

    The crop's side is ``fraction`` of a block's side, so every photo is seen at
    a similar relative scale whatever its resolution.
    """
    photo = _photo(name)
    block = int(min(photo.size) * _BLOCK)
    corners = _blocks(name, split)
    x, y = corners[int(rng.integers(len(corners)))]
    side = rng.uniform(*fraction) * block
    x0, y0 = x + rng.uniform(0, block - side), y + rng.uniform(0, block - side)
    crop = photo.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX, box=(x0, y0, x0 + side, y0 + side))
    array = np.asarray(crop.convert("RGB"), dtype=np.float64)
    if rng.random() < 0.5:
        array = array[:, ::-1]
    return array


# -- real image sets ------------------------------------------------------------------------------
@functools.cache
def _digit_pool() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten digits as uint8 8x8 grey images and their targets."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return np.rint(data.images / 16.0 * 255.0).astype(np.uint8), data.target


def _digits_of(label: int) -> np.ndarray:
    images, targets = _digit_pool()
    return images[targets == label]


@_register("digits", [f"digit {d}" for d in range(10)],
           "scikit-learn's handwritten digits (8x8 scans, real), upscaled to 26-30 px, nearly centred, "
           "light strokes on a dark ground", pool=_digits_of)
def _digit(rng: np.random.Generator, source: np.ndarray, split: int) -> np.ndarray:
    size = int(rng.integers(26, 31))
    glyph = np.asarray(Image.fromarray(source).resize((size, size), Image.BICUBIC), np.float64)[..., None] / 255.0
    alpha = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 1))
    y, x = (IMAGE_SIZE - size) // 2 + rng.integers(-1, 2, 2)
    alpha[y:y + size, x:x + size] = np.clip(glyph, 0, 1)
    ink = rng.uniform(190, 255) * np.array([1.0, 1.0, 1.0]) - rng.uniform(0, 40, 3)
    ground = rng.uniform(0, 45, 3)
    return _composite(_flat(rng, ground, 4.0), ink, alpha)


ANIMAL_SHAPE_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
"""animal-shape-mnist's labels 0-9, in order."""
ANIMALS = ("bird", "cat", "elephant", "giraffe", "horse", "sheep", "zebra")
"""The ones the task keeps: bear, cow and dog are left out, being the quadrupeds a 32 px silhouette confuses most."""


@functools.cache
def _animal_pool() -> tuple[np.ndarray, np.ndarray]:
    """The animal-shape-mnist silhouettes (uint8 28x28) and labels, exact duplicates dropped.

    Read from the wheel's own files with an unpickler that admits only numpy
    arrays (the package's loader imports TensorFlow, which we do not install).
    """
    from importlib.metadata import distribution

    dist = distribution("animal-shape-mnist")
    folder = "animal_shape_mnist/data/Animal Shape"
    images = _load_arrays(dist.locate_file(f"{folder}/animal_data_version_3.gz"))
    labels = _load_arrays(dist.locate_file(f"{folder}/animal_label_version_3.gz"))
    first: dict[bytes, int] = {}
    for index, image in enumerate(images):
        first.setdefault(hashlib.sha1(image.tobytes()).digest(), index)
    keep = np.fromiter(first.values(), dtype=np.int64)
    return images[keep], labels[keep]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a data file is not allowed to run code."""

    _ALLOWED = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                          ("numpy", "ndarray"), ("numpy", "dtype")})

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _load_arrays(path: object) -> np.ndarray:
    with gzip.open(str(path), "rb") as handle:
        return np.asarray(_ArrayUnpickler(handle).load())


def _animals_of(label: int) -> np.ndarray:
    images, labels = _animal_pool()
    return images[labels == ANIMAL_SHAPE_CLASSES.index(ANIMALS[label])]


@_register("animals", ANIMALS,
           "animal silhouettes of animal-shape-mnist (28x28, real, MIT), dark at 28-30 px, nearly centred, "
           "against a random sky gradient", pool=_animals_of)
def _animal(rng: np.random.Generator, source: np.ndarray, split: int) -> np.ndarray:
    size = int(rng.integers(28, 31))
    shape = np.asarray(Image.fromarray(source).resize((size, size), Image.BILINEAR), np.float64) / 255.0
    alpha = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 1))
    y, x = (IMAGE_SIZE - size) // 2 + rng.integers(-1, 2, 2)
    alpha[y:y + size, x:x + size, 0] = shape
    if rng.random() < 0.5:
        alpha = alpha[:, ::-1]
    sky = _gradient(rng, _hsv(rng.uniform(190, 230), rng.uniform(0.3, 0.8), rng.uniform(0.6, 1.0)),
                    _hsv(rng.uniform(10, 60), rng.uniform(0.1, 0.6), rng.uniform(0.8, 1.0)))
    return _composite(sky + rng.normal(0, 3, (IMAGE_SIZE, IMAGE_SIZE, 1)), rng.uniform(0, 60, 3), alpha)


TEXTURE_PHOTOS = {"brick wall": "brick", "grass": "grass", "gravel": "gravel", "cell microscopy": "cell",
                  "coins": "coins", "cameraman": "camera", "handwritten maths": "text"}


@_register("textures", tuple(TEXTURE_PHOTOS),
           "grey crops of scikit-image's sample photos (brick, grass, gravel, cell, coins, cameraman, "
           "handwritten maths; CC0 / public domain): which photo the crop is from")
def _texture(rng: np.random.Generator, label: int, split: int) -> np.ndarray:
    crop = _block_crop(rng, TEXTURE_PHOTOS[_REGISTRY["textures"].labels[label]], split)
    if rng.random() < 0.5:
        crop = crop[::-1]
    mean = crop.mean()
    return (crop - mean) * rng.uniform(0.7, 1.3) + mean + rng.uniform(-30, 30)


SCENE_PHOTOS = {"astronaut": "astronaut", "tabby cat": "chelsea", "coffee cup": "coffee", "rocket launch": "rocket",
                "deep sky": "hubble_deep_field", "tissue stain": "immunohistochemistry", "retina": "retina",
                "temple": "china", "flower": "flower"}


@_register("scenes", tuple(SCENE_PHOTOS),
           "colour crops of scikit-image's photos (astronaut, cat, coffee, rocket, Hubble deep field, tissue, "
           "retina; CC0 / public domain) and scikit-learn's china.jpg (danielbuechele) and flower.jpg (vultilion) "
           "(both CC BY 2.0, Flickr): which photo")
def _scene(rng: np.random.Generator, label: int, split: int) -> np.ndarray:
    return _block_crop(rng, SCENE_PHOTOS[_REGISTRY["scenes"].labels[label]], split)


# -- rendered tasks -------------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "five-point star", "cross", "hexagon", "ring", "crescent")


def _regular(sides: int, radius: float, start: float = -math.pi / 2) -> np.ndarray:
    angles = start + np.arange(sides) * 2 * math.pi / sides
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * radius


def _shape_points(label: int, radius: float) -> np.ndarray | None:
    """The outline of a polygonal shape (None for the round ones), centred at 0, before rotation."""
    name = SHAPES[label]
    if name == "square":
        return _regular(4, radius * 1.1, math.pi / 4)
    if name == "triangle":
        return _regular(3, radius * 1.2)
    if name == "hexagon":
        return _regular(6, radius)
    if name == "five-point star":
        outer, inner = _regular(5, radius * 1.2), _regular(5, radius * 0.5, -math.pi / 2 + math.pi / 5)
        return np.stack([outer, inner], axis=1).reshape(-1, 2)
    if name == "cross":
        a, b = radius, radius * 0.36
        return np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b],
                         [-a, -b], [-b, -b]])
    return None


@_register("shapes", SHAPES,
           "rendered filled shapes (circle, square, triangle, star, cross, hexagon, ring, crescent), random size, "
           "rotation, place and hues, light on a dark flat noisy ground")
def _shape(rng: np.random.Generator, label: int, split: int) -> np.ndarray:
    radius = rng.uniform(9.5, 12.5)
    cx, cy = _CENTRE + rng.uniform(-2, 2, 2)
    angle = rng.uniform(0, 2 * math.pi)
    mask, draw = _canvas()
    points = _shape_points(label, radius)
    if points is not None:
        _polygon(draw, _rotate(points, angle), (cx, cy))
    else:
        _disc(draw, cx, cy, radius)
        if SHAPES[label] == "ring":
            _disc(draw, cx, cy, radius * 0.55, fill=0)
        else:  # crescent: a disc less a shifted disc
            dx, dy = math.cos(angle) * radius * 0.55, math.sin(angle) * radius * 0.55
            _disc(draw, cx + dx, cy + dy, radius * 0.9, fill=0)
    # light on dark, any hues: the outline, not the colour, tells the shape
    ground = _hsv(rng.uniform(0, 360), rng.uniform(0.3, 1.0), rng.uniform(0.1, 0.4))
    ink = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.7), rng.uniform(0.75, 1.0))
    return _composite(_flat(rng, ground, 6.0), ink, _alpha(mask))


@_register("counting", ["1 dot", *(f"{n} dots" for n in range(2, 7))],
           "rendered counting: 1 to 6 bright dots (radius 2.6-3.1 px) at random places on a dark green cloudy ground")
def _dots(rng: np.random.Generator, label: int, split: int) -> np.ndarray:
    count = label + 1
    radius = rng.uniform(2.6, 3.1)
    gap = 2 * radius + 1.5
    centres: list[np.ndarray] = []
    while len(centres) < count:
        centre = rng.uniform(radius + 1, IMAGE_SIZE - radius - 1, 2)
        if all(np.linalg.norm(centre - other) >= gap for other in centres):
            centres.append(centre)
    mask, draw = _canvas()
    for cx, cy in centres:
        _disc(draw, cx, cy, radius * rng.uniform(0.95, 1.05))
    ground = _hsv(rng.uniform(100, 170), rng.uniform(0.4, 0.9), rng.uniform(0.15, 0.4)) * (
        0.7 + 0.6 * _clouds(rng, 4)[..., None])
    ink = _hsv(rng.uniform(30, 70), rng.uniform(0.0, 0.6), rng.uniform(0.85, 1.0))
    return _composite(ground + rng.normal(0, 5, (IMAGE_SIZE, IMAGE_SIZE, 1)), ink, _alpha(mask))


ORIENTATIONS = tuple(22.5 * k for k in range(8))


@_register("orientation", [f"{a:g} degrees" for a in ORIENTATIONS],
           "rendered sine gratings whose stripes run at 0, 22.5, ... 157.5 degrees (±5), random period, phase, "
           "contrast and window, on a grey noisy ground")
def _grating(rng: np.random.Generator, label: int, split: int) -> np.ndarray:
    ys, xs = _grid()
    theta = math.radians(ORIENTATIONS[label] + 90 + rng.uniform(-5, 5))
    period = rng.uniform(4.5, 10.0)
    cx, cy = rng.uniform(12, 20, 2)
    wave = np.sin(2 * math.pi * ((xs - cx) * math.cos(theta) - (ys - cy) * math.sin(theta)) / period
                  + rng.uniform(0, 2 * math.pi))
    window = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * rng.uniform(6, 14) ** 2))
    grey = rng.uniform(90, 160)
    value = grey + rng.uniform(40, 100) * window * wave + rng.normal(0, 10, wave.shape)
    tint = 1.0 + rng.uniform(-0.08, 0.08, 3)
    return value[..., None] * tint


PATTERNS = ("checkerboard", "stripes", "polka dots", "white noise", "clouds", "concentric rings", "crosshatch",
            "zigzag")


def _pattern_field(rng: np.random.Generator, name: str) -> np.ndarray:
    """The pattern as a field in [0, 1] (IMAGE_SIZE, IMAGE_SIZE) that mixes its two colours."""
    ys, xs = _grid()
    angle = rng.uniform(0, math.pi)
    u = (xs - _CENTRE) * math.cos(angle) - (ys - _CENTRE) * math.sin(angle) + rng.uniform(0, 16)
    v = (xs - _CENTRE) * math.sin(angle) + (ys - _CENTRE) * math.cos(angle) + rng.uniform(0, 16)
    period = rng.uniform(5.0, 11.0)
    phase_u, phase_v = 2 * math.pi * u / period, 2 * math.pi * v / period
    if name == "checkerboard":
        return (np.sign(np.sin(phase_u)) * np.sign(np.sin(phase_v)) > 0).astype(np.float64)
    if name == "stripes":
        return (np.sin(phase_u) > 0).astype(np.float64)
    if name == "polka dots":
        du, dv = (u / period) % 1 - 0.5, (v / period) % 1 - 0.5
        return (np.hypot(du, dv) < rng.uniform(0.2, 0.35)).astype(np.float64)
    if name == "white noise":
        return rng.random(xs.shape)
    if name == "clouds":
        return _clouds(rng, int(rng.integers(3, 7)))
    if name == "concentric rings":
        cx, cy = rng.uniform(4, 28, 2)
        return (np.sin(2 * math.pi * np.hypot(xs - cx, ys - cy) / period) > 0).astype(np.float64)
    if name == "crosshatch":
        width = rng.uniform(0.15, 0.3)
        return ((np.abs((u / period) % 1 - 0.5) < width / 2) | (np.abs((v / period) % 1 - 0.5) < width / 2)
                ).astype(np.float64)
    # zigzag: stripes along v displaced by a triangle wave along u
    tri = np.abs((u / period) % 1 - 0.5) * 2
    return (np.sin(2 * math.pi * (v + tri * period * rng.uniform(0.5, 1.0)) / period) > 0).astype(np.float64)


@_register("patterns", PATTERNS,
           "rendered two-colour patterns (checkerboard, stripes, dots, white noise, clouds, rings, crosshatch, "
           "zigzag) at random scale, angle and colours")
def _pattern(rng: np.random.Generator, label: int, split: int) -> np.ndarray:
    field = _pattern_field(rng, PATTERNS[label])[..., None]
    first = _random_colour(rng)
    second = _random_colour(rng, first)
    return first * (1 - field) + second * field + rng.normal(0, 6, (IMAGE_SIZE, IMAGE_SIZE, 1))


COLOURS = {"red": 0, "orange": 30, "yellow": 58, "green": 120, "cyan": 182, "blue": 228, "purple": 275,
           "pink": 325}


@_register("colours", tuple(COLOURS),
           "rendered colour naming: an ellipse of one hue (±12 degrees, random saturation and value) on a "
           "grey cloudy ground")
def _colour(rng: np.random.Generator, label: int, split: int) -> np.ndarray:
    hue = list(COLOURS.values())[label] + rng.uniform(-12, 12)
    ink = _hsv(hue, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    rx, ry = rng.uniform(5, 13, 2)
    centre = tuple(rng.uniform(10, 22, 2))
    steps = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    outline = np.stack([np.cos(steps) * rx, np.sin(steps) * ry], axis=1)
    mask, draw = _canvas()
    _polygon(draw, _rotate(outline, rng.uniform(0, math.pi)), centre)
    grey = rng.uniform(50, 200) + rng.uniform(20, 70) * (_clouds(rng, 5) - 0.5)
    ground = grey[..., None] + rng.normal(0, 8, (IMAGE_SIZE, IMAGE_SIZE, 1))
    return _composite(ground, ink, _alpha(mask))


LETTERS = "ABCDEFGHJK"


@_register("letters", [f"letter {c}" for c in LETTERS],
           "rendered capital letters A-K (no I) in Pillow's built-in Aileron font, random size, weight, "
           "rotation (±15 degrees) and place (±2 px), dark ink on a light paper ground")
def _letter(rng: np.random.Generator, label: int, split: int) -> np.ndarray:
    alpha = _glyph_alpha(rng, LETTERS[label], (22, 28), 15)
    paper = _hsv(rng.uniform(30, 60), rng.uniform(0.05, 0.25), rng.uniform(0.8, 1.0))
    ground = paper * (0.88 + 0.2 * _clouds(rng, 4)[..., None]) + rng.normal(0, 4, (IMAGE_SIZE, IMAGE_SIZE, 1))
    ink = _hsv(rng.uniform(200, 260), rng.uniform(0.0, 0.7), rng.uniform(0.05, 0.4))
    return _composite(ground, ink, alpha)


SYMBOLS = {"plus sign": "+", "equals sign": "=", "percent sign": "%", "hash sign": "#", "at sign": "@",
           "ampersand": "&", "question mark": "?", "exclamation mark": "!", "dollar sign": "$", "asterisk": "*"}


@_register("symbols", tuple(SYMBOLS),
           "rendered symbols (+ = % # @ & ? ! $ *) in Pillow's built-in Aileron font, light on darkened, blurred "
           "crops of scikit-learn's china.jpg (danielbuechele) and flower.jpg (vultilion), both CC BY 2.0")
def _symbol(rng: np.random.Generator, label: int, split: int) -> np.ndarray:
    alpha = _glyph_alpha(rng, list(SYMBOLS.values())[label], (22, 30), 15)
    ground = _block_crop(rng, "china" if rng.random() < 0.5 else "flower", split) * rng.uniform(0.25, 0.5)
    ground = np.asarray(Image.fromarray(_to_uint8(ground)).filter(ImageFilter.GaussianBlur(1.0)), np.float64)
    ink = _hsv(rng.uniform(0, 360), rng.uniform(0.0, 0.5), rng.uniform(0.75, 1.0))
    return _composite(ground, ink, alpha)


DIRECTIONS = ("east", "north-east", "north", "north-west", "west", "south-west", "south", "south-east")


@_register("arrows", [f"arrow {d}" for d in DIRECTIONS],
           "rendered arrows pointing in 8 directions (±8 degrees), random length, width, place (±3 px) and colour "
           "on a pastel gradient")
def _arrow(rng: np.random.Generator, label: int, split: int) -> np.ndarray:
    length, width = rng.uniform(20, 28), rng.uniform(2.4, 4.0)
    head = rng.uniform(0.3, 0.45) * length
    half, tip = length / 2, width * rng.uniform(1.8, 2.6)
    outline = np.array([[-half, -width / 2], [half - head, -width / 2], [half - head, -tip], [half, 0],
                        [half - head, tip], [half - head, width / 2], [-half, width / 2]])
    angle = -math.radians(45 * label + rng.uniform(-8, 8))  # y points down: clockwise on screen
    slack = min(3.0, (IMAGE_SIZE - length) / 2 - 1)
    centre = (_CENTRE + rng.uniform(-slack, slack), _CENTRE + rng.uniform(-slack, slack))
    mask, draw = _canvas()
    _polygon(draw, _rotate(outline, angle), centre)
    top = _hsv(rng.uniform(0, 360), rng.uniform(0.1, 0.35), rng.uniform(0.85, 1.0))
    bottom = _hsv(rng.uniform(0, 360), rng.uniform(0.1, 0.35), rng.uniform(0.85, 1.0))
    ground = _gradient(rng, top, bottom, tilt=math.pi) + rng.normal(0, 3, (IMAGE_SIZE, IMAGE_SIZE, 1))
    ink = _hsv(rng.uniform(0, 360), rng.uniform(0.5, 1.0), rng.uniform(0.2, 0.7))
    return _composite(ground, ink, _alpha(mask))


TASKS: tuple[str, ...] = ("digits", "animals", "textures", "scenes", "shapes", "counting", "orientation", "patterns",
                          "colours", "letters", "symbols", "arrows")
"""The twelve tasks, in the suite's fixed order."""


# -- domain shifts --------------------------------------------------------------------------------
def _shift(images: np.ndarray, shift: str, rng: np.random.Generator) -> np.ndarray:
    """``images`` (N, H, W, 3) uint8 seen in another domain; same order, same count.

    - colour: channels rotated (R, G, B) <- (B, R, G) and a fixed cast, so grey images change too;
    - noise: gaussian, sigma 24 levels;
    - blur: gaussian, sigma 1 px;
    - sketch: the Sobel edge magnitude of the luminance, inverted (dark lines on white), per image
      scaled by its 99th percentile;
    - inverted: 255 - x.
    """
    x = images.astype(np.float64)
    if shift == "colour":
        out = x[..., [2, 0, 1]] * np.array([0.6, 0.9, 1.0]) + np.array([60.0, 20.0, 0.0])
    elif shift == "noise":
        out = x + rng.normal(0.0, 24.0, x.shape)
    elif shift == "blur":
        out = _gaussian_blur(x, sigma=1.0)
    elif shift == "sketch":
        out = _sketch(x)
    elif shift == "inverted":
        out = 255.0 - x
    else:
        raise ValueError(f"unknown shift {shift!r}; choose one of {', '.join(SHIFTS)}")
    return _to_uint8(out)


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """A separable gaussian over the image axes of (N, H, W, C), edges replicated."""
    radius = math.ceil(3 * sigma)
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    taps /= taps.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * x.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(x, pad, mode="edge")
        length = x.shape[axis]
        x = sum(w * np.take(padded, np.arange(i, i + length), axis=axis) for i, w in enumerate(taps))
    return x


def _sketch(x: np.ndarray) -> np.ndarray:
    luma = x @ np.array([0.299, 0.587, 0.114])
    padded = np.pad(luma, [(0, 0), (1, 1), (1, 1)], mode="edge")
    h, w = luma.shape[1:]

    def at(dy: int, dx: int) -> np.ndarray:
        return padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    magnitude = np.hypot(gx, gy)
    scale = np.maximum(np.percentile(magnitude.reshape(len(x), -1), 99, axis=1), 32.0)[:, None, None]
    edges = 255.0 - np.clip(magnitude / scale, 0, 1) * 255.0
    return np.repeat(edges[..., None], 3, axis=-1)


# -- building -------------------------------------------------------------------------------------
def _task(task: str) -> _Task:
    if task not in _REGISTRY:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return _REGISTRY[task]


def label_names(task: str) -> list[str]:
    """The task's label names, in label order; no name is used by two tasks."""
    return list(_task(task).labels)


def describe(task: str) -> str:
    """One line: what the task is and where its images come from."""
    spec = _task(task)
    return f"{task} ({len(spec.labels)} classes): {spec.description}."


def _class_images(spec: _Task, split: int, label: int, counts: tuple[int, int, int]) -> list[np.ndarray]:
    """``counts[split]`` images of one label in one split (fewer for a real set that has fewer)."""
    seed = _seed(spec.name)
    wanted = counts[split]
    if spec.pool is None:
        return [spec.render(np.random.default_rng([seed, split, label, i]), label, split) for i in range(wanted)]
    pool = spec.pool(label)
    order = np.random.default_rng([seed, label]).permutation(len(pool))
    # test first, then validation, then train: the evaluation splits keep their size when the set is short
    start = sum(counts[s] for s in (2, 1, 0)[:(2, 1, 0).index(split)])
    chosen = order[min(start, len(pool)):min(start + wanted, len(pool))]
    return [spec.render(np.random.default_rng([seed, split, label, int(i)]), pool[i], split) for i in chosen]


def _split_arrays(spec: _Task, split: int, counts: tuple[int, int, int]) -> tuple[np.ndarray, list[int]]:
    """A split's images (N, H, W, 3) uint8 and labels, in round-robin order of the labels."""
    per_label = [_class_images(spec, split, label, counts) for label in range(len(spec.labels))]
    images, labels = [], []
    for i in range(max((len(p) for p in per_label), default=0)):
        for label, made in enumerate(per_label):
            if i < len(made):
                images.append(_to_uint8(made[i]))
                labels.append(label)
    return np.stack(images), labels


def build_task(task: str, counts: tuple[int, int, int], shift: str | None = None) -> datasets.DatasetDict:
    """The task as a ``DatasetDict`` with splits ``train``, ``validation`` and ``test``.

    Args:
        task: one of :data:`TASKS`.
        counts: images *per label* in train, validation and test. The real
            image sets have only so many: ``digits`` 174-183 per label,
            ``animals`` 812-1000; for them the test split is filled first, then
            validation, and train gets what is left (so train may be smaller
            than asked). The rendered and crop tasks make as many as asked.
        shift: None, or one of :data:`SHIFTS`: the same rows (same images,
            labels and order) seen in that domain.

    Returns:
        Columns ``image`` (PIL RGB, IMAGE_SIZE px) and ``label`` (``ClassLabel``
        with :func:`label_names`). The same arguments give the same images in
        the same order, hence the same parquet bytes.
    """
    import datasets

    spec = _task(task)
    counts = _check_counts(counts)
    if shift is not None and shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; choose one of {', '.join(SHIFTS)} or None")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(spec.labels))})
    splits = {}
    for index, split in enumerate(SPLITS):
        images, labels = _split_arrays(spec, index, counts)
        if shift is not None:
            images = _shift(images, shift, np.random.default_rng([_seed(task, shift), index]))
        pil = [Image.fromarray(image) for image in images]
        splits[split] = datasets.Dataset.from_dict({"image": pil, "label": labels}, features=features)
    return datasets.DatasetDict(splits)


def _check_counts(counts: tuple[int, int, int]) -> tuple[int, int, int]:
    values = tuple(counts)
    if len(values) != 3 or not all(isinstance(c, (int, np.integer)) and c >= 1 for c in values):
        raise ValueError(f"counts must be three positive ints (train, validation, test per label), not {counts!r}")
    return tuple(int(c) for c in values)  # type: ignore[return-value]


def push_task(bench: Bench, task: str, counts: tuple[int, int, int], shift: str | None = None) -> str:
    """Build (or take from the bench's cache) the task and push it as dataset repo ``task`` or ``task-shift``.

    Returns the dataset's repo id.
    """
    from benchmarks.suite.bench import fingerprint

    _task(task)
    name = task if shift is None else f"{task}-{shift}"
    description = describe(task) + ("" if shift is None else f" Domain shift: {shift}.")
    return bench.push_dataset(name, lambda: build_task(task, counts, shift),
                              key=fingerprint(task, tuple(counts), shift, VERSION), description=description)
