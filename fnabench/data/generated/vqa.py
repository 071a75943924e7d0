"""Generated VQA scenes with known answers: up to four coloured shapes in the quadrants of a grey canvas.

Every scene holds 1–4 objects, each in its own quadrant, with distinct shapes and distinct colours, so
each question below has exactly one answer. Four question types, each with four balanced answers
(chance is 25 %):

- colour:   "what colour is the object in the top left?"   → red | green | blue | yellow
- shape:    "what shape is the object in the bottom right?" → circle | square | triangle | cross
- position: "where is the blue object?"                     → top left | top right | bottom left | bottom right
- count:    "how many objects are there?"                   → one | two | three | four

Answering needs every patch token: which quadrant holds what is spread over the image, and the
count needs all four quadrants. Seeded (``numpy.random.default_rng``), so a split is the same
everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from fnabench.data.generated.retrieval import _polygon

#: bump when the scenes or their drawing change (cached image features depend on it)
DRAW_VERSION = 1
#: bump when drawing or questions change (checkpoints and the task file depend on it)
VERSION = 2
COLOURS = {"red": (215, 35, 35), "green": (40, 170, 60), "blue": (35, 75, 225), "yellow": (240, 210, 35)}
SHAPES = ("circle", "square", "triangle", "cross")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
COUNTS = ("one", "two", "three", "four")
KINDS = ("colour", "shape", "position", "count")
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "position": QUADRANTS, "count": COUNTS}


@dataclass(frozen=True)
class Thing:
    """One object of a scene."""

    shape: str
    colour: str
    quadrant: str
    cx: float  # centre, as a fraction of the side
    cy: float
    radius: float  # as a fraction of the side


@dataclass(frozen=True)
class Question:
    """One question about a scene, its answer and its type (one of :data:`KINDS`)."""

    text: str
    answer: str
    kind: str


@dataclass(frozen=True)
class Scene:
    """A scene's objects and background; :meth:`image` draws it."""

    things: tuple[Thing, ...]
    background: tuple[int, int, int]

    def image(self, px: int) -> Image.Image:
        """The scene as a ``px`` × ``px`` RGB image."""
        image = Image.new("RGB", (px, px), self.background)
        canvas = ImageDraw.Draw(image)
        for t in self.things:
            cx, cy, r = t.cx * px, t.cy * px, t.radius * px
            fill = COLOURS[t.colour]
            if t.shape == "circle":
                canvas.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            elif t.shape == "square":
                s = r * 0.82
                canvas.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
            else:
                canvas.polygon(_polygon(t.shape, cx, cy, r), fill=fill)
        return image

    def questions(self) -> list[Question]:
        """Every question this scene answers: colour, shape and position of each object, and the count."""
        out = []
        for t in self.things:
            out.append(Question(f"what colour is the object in the {t.quadrant}?", t.colour, "colour"))
            out.append(Question(f"what shape is the object in the {t.quadrant}?", t.shape, "shape"))
            out.append(Question(f"where is the {t.colour} object?", t.quadrant, "position"))
        out.append(Question("how many objects are there?", COUNTS[len(self.things) - 1], "count"))
        return out


def make_scene(rng: np.random.Generator, count: int | None = None) -> Scene:
    """A random scene with ``count`` objects (default: 1–4, uniform)."""
    k = int(rng.integers(1, 5)) if count is None else count
    quadrants = rng.permutation(len(QUADRANTS))[:k]
    shapes = rng.permutation(len(SHAPES))[:k]
    colours = rng.permutation(len(COLOURS))[:k]
    names = list(COLOURS)
    things = []
    for q, s, c in zip(quadrants, shapes, colours, strict=True):
        row, col = divmod(int(q), 2)
        radius = float(rng.uniform(0.12, 0.19))
        jitter = 0.23 - radius  # the object stays inside its quadrant
        cx = 0.25 + 0.5 * col + float(rng.uniform(-jitter, jitter)) * 0.5
        cy = 0.25 + 0.5 * row + float(rng.uniform(-jitter, jitter)) * 0.5
        things.append(Thing(SHAPES[int(s)], names[int(c)], QUADRANTS[int(q)], cx, cy, radius))
    grey = int(rng.integers(90, 170))
    tint = rng.integers(-12, 13, size=3)
    background = tuple(int(np.clip(grey + d, 0, 255)) for d in tint)
    return Scene(tuple(things), background)  # type: ignore[arg-type]


def scenes(n: int, seed: int) -> list[Scene]:
    """``n`` scenes from ``seed``; object counts cycle 1, 2, 3, 4 so counts are balanced."""
    rng = np.random.default_rng([DRAW_VERSION, seed])
    return [make_scene(rng, count=1 + i % 4) for i in range(n)]


def balanced_questions(items: list[Scene], per_kind: int, seed: int) -> list[tuple[int, Question]]:
    """``per_kind`` (scene index, question) pairs of each kind, at most one per scene and kind, answers balanced.

    Scenes are visited in a seeded order; a question is taken while its answer is among the least used
    so far for its kind, so each answer gets a quarter of each kind (give enough scenes).
    """
    rng = np.random.default_rng([DRAW_VERSION, seed, 1])
    order = [int(i) for i in rng.permutation(len(items))]
    picked: list[tuple[int, Question]] = []
    for kind in KINDS:
        used = dict.fromkeys(ANSWERS[kind], 0)
        for i in order:
            if sum(used.values()) >= per_kind:
                break
            options = [q for q in items[i].questions() if q.kind == kind and used[q.answer] == min(used.values())]
            if options:
                q = options[int(rng.integers(len(options)))]
                used[q.answer] += 1
                picked.append((i, q))
    return picked

#: the held-out questions of the offline lmms-eval task: scenes of their own seed, 50 questions per kind
TEST_SEED, TEST_SCENES, TEST_PER_KIND = 20_000, 400, 50


def scene_to_dict(scene: Scene) -> dict:
    """A JSON-able description that :func:`scene_from_dict` draws back exactly."""
    return {"background": list(scene.background),
            "things": [{"shape": t.shape, "colour": t.colour, "quadrant": t.quadrant, "cx": round(t.cx, 5),
                        "cy": round(t.cy, 5), "radius": round(t.radius, 5)} for t in scene.things]}


def scene_from_dict(data: dict) -> Scene:
    things = tuple(Thing(t["shape"], t["colour"], t["quadrant"], float(t["cx"]), float(t["cy"]), float(t["radius"]))
                   for t in data["things"])
    return Scene(things, tuple(int(c) for c in data["background"]))  # type: ignore[arg-type]


def test_docs(per_kind: int = TEST_PER_KIND, seed: int = TEST_SEED, num_scenes: int = TEST_SCENES) -> list[dict]:
    """The offline VQA task's documents: question, answer, kind and the scene to draw, balanced answers."""
    items = scenes(num_scenes, seed)
    picked = balanced_questions(items, per_kind, seed)
    by_kind = [[p for p in picked if p[1].kind == kind] for kind in KINDS]
    interleaved = [p for group in zip(*by_kind, strict=True) for p in group]  # any --limit sees every kind
    docs = []
    for i, (index, q) in enumerate(interleaved):
        docs.append({"question_id": i, "question": q.text, "answer": q.answer, "kind": q.kind,
                     "scene_id": index, "scene": scene_to_dict(items[index])})
    return docs
