"""A seeded semantic-segmentation set that needs no download: textured shapes and regions on textured
backgrounds, with masks known by construction.

Each class is a material whose texture comes from a photograph that ships inside an installed package
(scikit-image, scikit-learn, matplotlib): brick, grass, gravel, printed text, stained cells, a star field
and cat fur; class 0 (background) is any of several other photographs. Every image fills a background,
then one or two large regions with wavy boundaries and two to five shapes (ellipses, rotated boxes,
triangles, blobs), each with a randomly chosen material; the label map is drawn with the same masks.
Textures are cut at random positions, scales, rotations and tints; training images cut from the left
70 % of each photograph and test images from the right 30 %, so a test texture was never seen in training.

The folder layout is mmseg's (``img_dir/{train,test}/*.png``, ``ann_dir/{train,test}/*.png``, labels as
8-bit indices), written once per parameter set under fnabench's cache.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fnabench._errors import TaskError
from fnabench.data.cache import cache_root
from fnabench.data.images import _matplotlib, _skimage, _sklearn

VERSION = 1
MARKER = "fnabench-seg-synthetic.json"
#: class name → the packaged photographs its texture is cut from
MATERIALS: dict[str, tuple[str, ...]] = {
    "background": ("skimage/astronaut", "skimage/coffee", "skimage/rocket", "sklearn/china", "sklearn/flower",
                   "matplotlib/grace_hopper", "skimage/camera", "skimage/clock", "skimage/moon"),
    "brick": ("skimage/brick",),
    "grass": ("skimage/grass",),
    "gravel": ("skimage/gravel",),
    "text": ("skimage/page", "skimage/text"),
    "cells": ("skimage/immunohistochemistry",),
    "stars": ("skimage/hubble_deep_field",),
    "fur": ("skimage/chelsea",),
}
CLASSES = tuple(MATERIALS)
PALETTE = ((0, 0, 0), (180, 60, 40), (60, 160, 60), (130, 130, 130), (240, 240, 240), (150, 60, 150),
           (30, 30, 120), (210, 160, 90))
TRAIN_SHARE = 0.7


@functools.lru_cache(maxsize=1)
def _photographs() -> dict[str, np.ndarray]:
    """The packaged photographs by name, as float RGB arrays in [0, 1] (read once per process)."""
    found = {name: np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
             for name, img in _skimage() + _sklearn() + _matplotlib()}
    missing = sorted({p for sources in MATERIALS.values() for p in sources} - set(found))
    if missing:
        raise TaskError(f"seg-synthetic needs the sample images of scikit-image, scikit-learn and matplotlib; "
                        f"missing {', '.join(missing)}; run: pip install 'fnabench[data,plot]'")
    return found


def _texture(photo: np.ndarray, split: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A [size, size, 3] texture cut from ``split``'s part of ``photo``: random scale, position, rotation, tint."""
    w = photo.shape[1]
    cut = int(w * TRAIN_SHARE)
    part = photo[:, :cut] if split == "train" else photo[:, cut:]
    ph, pw, _ = part.shape
    side = int(min(ph, pw, size * rng.uniform(0.5, 1.5)))
    y, x = rng.integers(0, ph - side + 1), rng.integers(0, pw - side + 1)
    patch = Image.fromarray((part[y:y + side, x:x + side] * 255).astype(np.uint8))
    patch = patch.resize((size, size), Image.BICUBIC).rotate(90 * int(rng.integers(4)))
    if rng.random() < 0.5:
        patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(patch, dtype=np.float32) / 255.0
    arr = arr * rng.uniform(0.75, 1.25, size=3) + rng.uniform(-0.1, 0.1)  # tint and brightness
    return np.clip(arr, 0, 1)


def _shape_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of one random shape: ellipse, rotated box, triangle or smooth blob."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = rng.uniform(0.15, 0.85, 2) * size
    radius = rng.uniform(0.08, 0.25) * size
    kind = rng.integers(4)
    if kind == 0:
        rx, ry = radius * rng.uniform(0.6, 1.4, 2)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    else:
        if kind == 1:  # rotated box
            angle = rng.uniform(0, np.pi)
            half = radius * rng.uniform(0.5, 1.3, 2)
            corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
            rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            points = corners @ rot.T
        elif kind == 2:  # triangle
            angles = np.sort(rng.uniform(0, 2 * np.pi, 3))
            points = np.stack([np.cos(angles), np.sin(angles)], 1) * radius * 1.3
        else:  # blob: a polygon with smoothly varying radius
            angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
            wobble = sum(rng.uniform(-0.25, 0.25) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
                         for k in (2, 3, 5))
            points = np.stack([np.cos(angles), np.sin(angles)], 1) * (radius * (1 + wobble))[:, None]
        draw.polygon([(float(cx + px), float(cy + py)) for px, py in points], fill=1)
    return np.asarray(canvas, dtype=bool)


def _region_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A large region: one side of a wavy line across the image."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    along = np.cos(angle) * xx + np.sin(angle) * yy
    across = -np.sin(angle) * xx + np.cos(angle) * yy
    wave = 0.06 * np.sin(2 * np.pi * rng.uniform(1, 3) * across + rng.uniform(0, 2 * np.pi))
    return along + wave > np.quantile(along, rng.uniform(0.45, 0.8))


def draw_sample(index: int, split: str, size: int, seed: int,
                photos: dict[str, np.ndarray]) -> tuple[Image.Image, Image.Image]:
    """Image ``index`` of ``split``: (RGB image, label map with values 0..len(CLASSES)-1)."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    labels = np.zeros((size, size), dtype=np.uint8)

    def material(cls: int) -> np.ndarray:
        sources = MATERIALS[CLASSES[cls]]
        return _texture(photos[sources[rng.integers(len(sources))]], split, size, rng)

    image = material(0)
    layers = [(_region_mask(size, rng), int(rng.integers(len(CLASSES)))) for _ in range(rng.integers(1, 3))]
    layers += [(_shape_mask(size, rng), int(rng.integers(1, len(CLASSES)))) for _ in range(rng.integers(2, 6))]
    for mask, cls in layers:
        image[mask] = material(cls)[mask]
        labels[mask] = cls
    picture = Image.fromarray((image * 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)
    return picture, Image.fromarray(labels, mode="L")


def _params(num_train: int, num_test: int, size: int, seed: int) -> dict:
    return {"version": VERSION, "num_train": num_train, "num_test": num_test, "size": size, "seed": seed,
            "classes": list(CLASSES)}


def write(root: str | os.PathLike, num_train: int, num_test: int, size: int, seed: int) -> Path:
    """Generate the set into ``root`` atomically (a temp folder renamed into place); returns ``root``."""
    root = Path(root)
    photos = _photographs()
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for split, count in (("train", num_train), ("test", num_test)):
            (tmp / "img_dir" / split).mkdir(parents=True)
            (tmp / "ann_dir" / split).mkdir(parents=True)
            for i in range(count):
                image, labels = draw_sample(i, split, size, seed, photos)
                image.save(tmp / "img_dir" / split / f"{i:05d}.png")
                labels.save(tmp / "ann_dir" / split / f"{i:05d}.png")
        (tmp / MARKER).write_text(json.dumps(_params(num_train, num_test, size, seed)))
        if root.exists():
            shutil.rmtree(root)
        root.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure(root: str | os.PathLike | None = None, num_train: int = 160, num_test: int = 48, size: int = 448,
           seed: int = 0) -> Path:
    """The set's folder, generated on first use (``root=None``: under fnabench's cache, named by its parameters)."""
    if root is None:
        root = cache_root() / f"seg-synthetic-v{VERSION}-{num_train}-{num_test}-px{size}-seed{seed}"
    root = Path(root)
    marker = root / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == _params(num_train, num_test, size, seed):
            return root
        return write(root, num_train, num_test, size, seed)
    if root.exists() and any(root.iterdir()):
        raise TaskError(f"seg-synthetic: {str(root)!r} exists and is not a generated set; give an empty or new folder")
    return write(root, num_train, num_test, size, seed)
