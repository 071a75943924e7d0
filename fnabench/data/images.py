"""Images that need no download: samples shipped inside installed packages, plus seeded synthetics.

Natural images come from scikit-image, scikit-learn and matplotlib when they are installed (each is
optional); synthetic images are always available and identical on every machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: scikit-image sample images that ship inside its wheel (no pooch download)
SKIMAGE_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "retina", "camera", "coins", "brick", "grass", "gravel", "moon", "page", "text", "clock")


def _skimage() -> list[tuple[str, Image.Image]]:
    try:
        from skimage import data
    except ImportError:
        return []
    out = []
    for name in SKIMAGE_NAMES:
        try:
            arr = getattr(data, name)()
        except Exception:  # a sample missing from this scikit-image version: skip it
            continue
        out.append((f"skimage/{name}", Image.fromarray(np.asarray(arr)).convert("RGB")))
    return out


def _sklearn() -> list[tuple[str, Image.Image]]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        return []
    bunch = load_sample_images()
    return [(f"sklearn/{Path(name).stem}", Image.fromarray(img))  # filenames are absolute paths
            for name, img in zip(bunch.filenames, bunch.images, strict=True)]


def _matplotlib() -> list[tuple[str, Image.Image]]:
    try:
        from matplotlib import cbook
    except ImportError:
        return []
    out = []
    for name in ("grace_hopper.jpg",):
        try:
            with cbook.get_sample_data(name) as f:
                out.append((f"matplotlib/{name.rsplit('.', 1)[0]}", Image.open(f).convert("RGB")))
        except (OSError, ValueError):
            continue
    return out


def synthetic_image(index: int, size: int = 256, seed: int = 0) -> Image.Image:
    """A seeded image with smooth colour fields, shapes and a few flat background regions."""
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3))
    for c in range(3):  # low-frequency colour field
        for _ in range(3):
            fx, fy, ph = rng.uniform(0.5, 4), rng.uniform(0.5, 4), rng.uniform(0, 2 * np.pi)
            img[..., c] += np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)
    img = (img - img.min()) / (np.ptp(img) + 1e-9)
    for _ in range(rng.integers(3, 7)):  # discs and boxes in solid colours
        colour = rng.uniform(0, 1, 3)
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.25)
        if rng.random() < 0.5:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        else:
            mask = (abs(xx - cx) < r) & (abs(yy - cy) < r * rng.uniform(0.3, 1))
        img[mask] = colour
    img += rng.normal(0, 0.02, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def offline_images(source: str = "images", limit: int | None = None, seed: int = 0,
                   num_synthetic: int = 8) -> list[tuple[str, Image.Image]]:
    """Named images: ``images`` = packaged natural images then ``num_synthetic`` synthetics;
    ``synthetic`` = synthetics only (identical everywhere). ``limit`` keeps the first N."""
    if source not in ("images", "synthetic"):
        raise ValueError(f"unknown image source {source!r}; accepted: images, synthetic")
    out: list[tuple[str, Image.Image]] = []
    if source == "images":
        out += _skimage() + _sklearn() + _matplotlib()
    count = num_synthetic if source == "images" else max(num_synthetic, limit or 32)
    out += [(f"synthetic/{seed}-{i}", synthetic_image(i, seed=seed)) for i in range(count)]
    return out[:limit] if limit else out
