"""A generated image–caption set for offline retrieval: coloured shapes on plain backgrounds, 5 captions each.

Seeded, so it is the same on every machine. It is written to disk in the layout CLIP_benchmark's
builder reads for ``mscoco_captions`` (``ROOT/val2014/*.png`` plus ``ROOT/coco_test_karpathy.json`` in
COCO caption format), so fnabench's ``clip_benchmark:shapes`` task and CLIP_benchmark's own CLI
(``--dataset mscoco_captions --dataset_root ROOT``) load the very same data through the same builder.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fnabench._errors import TaskError
from fnabench.data.cache import cache_root

#: bump when the drawing or the captions change, so cached sets are regenerated
VERSION = 1
MARKER = "fnabench_shapes.json"
IMAGE_DIR = "val2014"  # what CLIP_benchmark's builder opens for split "test"/"val"
CAPTIONS_PER_IMAGE = 5

COLOURS = {
    "red": (215, 35, 35), "green": (40, 160, 60), "blue": (35, 75, 215), "yellow": (240, 205, 35),
    "purple": (135, 55, 170), "orange": (245, 135, 25), "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUNDS = {"gray": (128, 128, 128), "white": (250, 250, 250), "black": (10, 10, 10)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
POSITIONS = {  # name → centre as a fraction of the side
    "top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73), "centre": (0.5, 0.5),
}
SIZES = {"small": 0.13, "large": 0.24}  # radius as a fraction of the side
SYNONYMS = {"circle": "round disc", "square": "box", "triangle": "three-sided shape", "diamond": "rhombus",
            "cross": "plus sign", "star": "five-pointed star"}


@dataclass(frozen=True)
class ShapeSample:
    """One generated image with its five captions and the attributes they describe."""

    image: Image.Image
    captions: list[str]
    shape: str
    colour: str
    position: str
    size: str
    background: str


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return [(cx + r * np.cos(a), cy - r * np.sin(a)) for a in angles]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.42
            a = np.pi / 2 + i * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy - rad * np.sin(a)))
        return pts
    if shape == "cross":
        t = r * 0.35
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(shape)


def draw(shape: str, colour: str, position: str, size: str, background: str, px: int = 96) -> Image.Image:
    """One RGB image: a single filled shape on a plain background."""
    image = Image.new("RGB", (px, px), BACKGROUNDS[background])
    canvas = ImageDraw.Draw(image)
    fx, fy = POSITIONS[position]
    cx, cy, r = fx * px, fy * px, SIZES[size] * px
    fill = COLOURS[colour]
    if shape == "circle":
        canvas.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        canvas.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        canvas.polygon(_polygon(shape, cx, cy, r), fill=fill)
    return image


def captions(shape: str, colour: str, position: str, size: str, background: str) -> list[str]:
    """Five captions that describe the same image in different words, like COCO's five annotators."""
    where = "in the centre" if position == "centre" else f"in the {position} corner"
    return [
        f"a {size} {colour} {shape} {where}",
        f"a {colour} {shape} on a {background} background",
        f"a picture of a {colour} {SYNONYMS[shape]}",
        f"a {background} image with a {size} {colour} {shape}",
        f"there is a {colour} {shape} {where} of the picture",
    ]


def samples(num_images: int = 50, px: int = 96, seed: int = 0) -> list[ShapeSample]:
    """``num_images`` distinct (shape, colour, position, size, background) combinations, drawn and captioned."""
    combos = [c for c in itertools.product(SHAPES, COLOURS, POSITIONS, SIZES, BACKGROUNDS) if c[1] != c[4]]
    if not 1 <= num_images <= len(combos):
        raise TaskError(f"shapes: num_images must be in 1..{len(combos)}, got {num_images}")
    rng = np.random.default_rng(seed)
    chosen = [combos[i] for i in rng.choice(len(combos), size=num_images, replace=False)]
    return [ShapeSample(draw(*c, px=px), captions(*c), *c) for c in chosen]


def _params(num_images: int, px: int, seed: int) -> dict:
    return {"version": VERSION, "num_images": num_images, "px": px, "seed": seed}


def write(root: str | os.PathLike, num_images: int = 50, px: int = 96, seed: int = 0) -> Path:
    """Write the set into ``root`` (images + COCO-format captions + a marker), atomically; returns ``root``."""
    root = Path(root)
    drawn = samples(num_images, px, seed)  # validates before anything touches the disk
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / IMAGE_DIR).mkdir(parents=True)
        images, annotations = [], []
        for i, sample in enumerate(drawn):
            name = f"shapes_{i:06d}.png"
            sample.image.save(tmp / IMAGE_DIR / name)
            images.append({"id": i, "file_name": name, "width": px, "height": px})
            for caption in sample.captions:
                annotations.append({"id": len(annotations), "image_id": i, "caption": caption})
        coco = {"info": {"description": "fnabench generated shapes", **_params(num_images, px, seed)},
                "images": images, "annotations": annotations}
        (tmp / "coco_test_karpathy.json").write_text(json.dumps(coco))
        (tmp / MARKER).write_text(json.dumps(_params(num_images, px, seed)))
        if root.exists():  # written by a concurrent process (or stale): keep one complete copy
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure(root: str | os.PathLike | None = None, num_images: int = 50, px: int = 96, seed: int = 0) -> Path:
    """The set's folder, generated on first use; ``root=None`` uses a folder under :func:`cache_root`."""
    if root is None:
        root = cache_root() / f"shapes-v{VERSION}-n{num_images}-px{px}-seed{seed}"
    root = Path(root)
    marker = root / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == _params(num_images, px, seed):
            return root
        return write(root, num_images, px, seed)
    if root.exists() and any(root.iterdir()):
        raise TaskError(f"shapes: {str(root)!r} exists and is not a generated shapes set; "
                        "give an empty or new folder as dataset_root")
    return write(root, num_images, px, seed)
