"""A generated image-classification set: which of eight shapes sits in a cluttered picture.

Each image is drawn from its own seed (split, index), so any subset is the same on every machine and
images are drawn when read, not held. One filled shape of a random colour, size, rotation and position
lies on a smooth random background with thin clutter strokes; the class is the shape. Small shapes,
near-identical classes (square vs rhombus, pentagon vs hexagon vs circle) and clutter keep a
frozen backbone's linear head well short of 100 %, so an approximation that loses detail shows.

``write_folder`` writes the set as an ImageFolder tree (``ROOT/<split>/<class>/*.png``), the layout
``classify:folder`` reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: bump when the drawing changes: trained heads and cached sets are keyed by it
VERSION = 1
CLASSES = ("circle", "triangle", "square", "rhombus", "pentagon", "hexagon", "star", "cross")
SPLITS = {"train": 1, "val": 2}  # seed stream per split: no image is in both


@dataclass(frozen=True)
class Difficulty:
    """How hard the pictures are: shape radius range (fraction of the side) and clutter strokes."""

    radius: tuple[float, float] = (0.06, 0.15)
    strokes: tuple[int, int] = (2, 7)
    noise: float = 10.0  # std of per-pixel noise, 0..255 scale


DEFAULT = Difficulty()
EASY = Difficulty(radius=(0.2, 0.3), strokes=(0, 0), noise=0.0)


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of ``shape`` (not the circle) centred at (cx, cy), radius r, rotated by ``angle``."""
    if shape in ("triangle", "square", "pentagon", "hexagon"):
        n = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[shape]
        pts = [(math.cos(angle + 2 * math.pi * i / n), math.sin(angle + 2 * math.pi * i / n)) for i in range(n)]
    elif shape == "rhombus":
        pts = [(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)]
    elif shape == "star":
        pts = [((1.0 if i % 2 == 0 else 0.45) * math.cos(2 * math.pi * i / 10),
                (1.0 if i % 2 == 0 else 0.45) * math.sin(2 * math.pi * i / 10)) for i in range(10)]
    elif shape == "cross":
        t = 0.33
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t),
               (-t, -t)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    if shape in ("rhombus", "star", "cross"):  # the regular polygons were rotated while placed
        c, s = math.cos(angle), math.sin(angle)
        pts = [(x * c - y * s, x * s + y * c) for x, y in pts]
    return [(cx + r * x, cy + r * y) for x, y in pts]


def _background(rng: np.random.Generator, px: int, noise: float) -> np.ndarray:
    """A smooth random colour field (a bilinear blend of four random corner colours) plus pixel noise."""
    corners = rng.uniform(30, 225, size=(2, 2, 3))
    t = np.linspace(0, 1, px)[:, None, None]
    top = corners[0, 0] * (1 - t) + corners[0, 1] * t  # [px, 1, 3] along x
    bottom = corners[1, 0] * (1 - t) + corners[1, 1] * t
    field = top[None, :, 0] * (1 - t) + bottom[None, :, 0] * t  # [px(y), px(x), 3]
    if noise:
        field = field + rng.normal(0, noise, size=field.shape)
    return np.clip(field, 0, 255)


def draw(label: int, seed: tuple[int, ...], px: int = 256, difficulty: Difficulty = DEFAULT) -> Image.Image:
    """The image of class ``label`` drawn from ``seed``: same seed, same picture."""
    rng = np.random.default_rng(list(seed))
    image = Image.fromarray(_background(rng, px, difficulty.noise).astype(np.uint8))
    canvas = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(difficulty.strokes[0], difficulty.strokes[1] + 1))):
        x0, y0, x1, y1 = rng.uniform(0, px, size=4)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        canvas.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 4)))
    r = rng.uniform(*difficulty.radius) * px
    margin = r + 0.08 * px  # inside the centre crop of a crop_pct >= 0.85 transform
    cx, cy = rng.uniform(margin, px - margin, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    base = np.asarray(image, dtype=np.float64)[int(cy), int(cx)]
    colour = rng.integers(0, 256, size=3)
    while np.abs(colour - base).sum() < 150:  # visible against the background under it
        colour = rng.integers(0, 256, size=3)
    fill = tuple(int(c) for c in colour)
    shape = CLASSES[label]
    if shape == "circle":
        canvas.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        canvas.polygon(_outline(shape, cx, cy, r, angle), fill=fill)
    return image.filter(ImageFilter.GaussianBlur(0.6))


@dataclass(frozen=True)
class ShapeImage:
    """One image of the set, drawn when opened (picklable, so data-loader workers can draw it)."""

    label: int
    seed: tuple[int, ...]
    px: int = 256
    difficulty: Difficulty = DEFAULT

    @property
    def name(self) -> str:
        return CLASSES[self.label]

    def open(self) -> Image.Image:
        return draw(self.label, self.seed, self.px, self.difficulty)


def images(split: str, per_class: int, *, seed: int = 0, px: int = 256,
           difficulty: Difficulty = DEFAULT) -> list[ShapeImage]:
    """``per_class`` images of every class for ``split`` (train or val), class-major order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    return [ShapeImage(c, (VERSION, seed, SPLITS[split], c, i), px, difficulty)
            for c in range(len(CLASSES)) for i in range(per_class)]


def write_folder(root: str | Path, splits: dict[str, int], *, seed: int = 0, px: int = 256,
                 difficulty: Difficulty = DEFAULT) -> Path:
    """Write ``ROOT/<split>/<class>/<class>_<i>.png`` for each split with that many images per class."""
    root = Path(root)
    for split, per_class in splits.items():
        for item in images(split, per_class, seed=seed, px=px, difficulty=difficulty):
            folder = root / split / item.name
            folder.mkdir(parents=True, exist_ok=True)
            item.open().save(folder / f"{item.name}_{item.seed[-1]:05d}.png")
    return root
