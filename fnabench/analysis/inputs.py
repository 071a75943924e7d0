"""What an analysis runs on: images for a vision tower, trace sequences for a recall GPT-2.

Images: ``packaged`` (the natural images inside installed packages, then 8 seeded synthetics: the same set
``fidelity:images`` uses), ``synthetic`` (seeded synthetics only), or image files and folders (searched
recursively). Recall models: traces of the model's own validation systems laid out as its evaluation
queries (``examples`` haystack examples × ``traces`` traces, one sequence each).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fnabench.analysis.capture import AnalysisInputError
from fnabench.data.images import offline_images
from fnabench.models.loaded import LoadedModel
from fnabench.tasks.recall.queries import iter_examples
from fnabench.tasks.recall.systems import make_corpus

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}
NAMED_SOURCES = ("packaged", "synthetic")


@dataclass
class Inputs:
    """Named inputs ready for :func:`fnabench.analysis.analyze`, the task name records file them under, the
    options that pin them down, and the raw images (for figures), when they are images."""

    task: str
    items: list[tuple[str, Any]]
    options: dict[str, Any] = field(default_factory=dict)
    images: list | None = None


def image_files(sources: list[str]) -> list[Path]:
    """Image files named by ``sources`` (files, or folders searched recursively); one-line error if none."""
    found: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise AnalysisInputError(f"--images {source!r}: no such file or folder; accepted: "
                                     f"{', '.join(NAMED_SOURCES)}, image files, or folders of them")
    if not found:
        raise AnalysisInputError(f"--images {' '.join(sources)}: no images found (suffixes "
                                 f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def image_inputs(sources: list[str] | None, limit: int | None = None) -> Inputs:
    """``sources`` (default ``packaged``) as named PIL images, the first ``limit`` of them."""
    from PIL import Image


    sources = list(sources or ["packaged"])
    if len(sources) == 1 and sources[0] in NAMED_SOURCES:
        named = offline_images("images" if sources[0] == "packaged" else "synthetic", limit)
        task, options = f"analysis:{sources[0]}", {}
    else:
        if any(s in NAMED_SOURCES for s in sources):
            raise AnalysisInputError(f"--images {' '.join(sources)}: {' or '.join(NAMED_SOURCES)} stands alone; "
                                     "accepted: one named set, or image files and folders")
        paths = image_files(sources)
        paths = paths[:limit] if limit else paths
        named = []
        for p in paths:
            try:
                with Image.open(p) as im:
                    named.append((str(p), im.convert("RGB")))
            except OSError as err:
                raise AnalysisInputError(f"--images: cannot read {p} ({err})") from None
        task, options = "analysis:files", {"images": sources}
    named = named[:limit] if limit else named
    return Inputs(task, named, options, [im for _, im in named])


def recall_inputs(loaded: LoadedModel, examples: int = 16, traces: int = 4, limit: int | None = None) -> Inputs:
    """Evaluation-query sequences of a recall GPT-2 (``recall:...``), built from its run's own validation systems."""
    import torch


    config = loaded.extra.get("config")
    if config is None:
        raise AnalysisInputError(f"{loaded.name}: traces need a recall model (recall:<preset-or-run>)")
    systems = make_corpus(config.data).val
    items = []
    for e, example in enumerate(iter_examples(systems, config.data, config.eval, "none", examples, traces)):
        for r in range(example.tokens.shape[0]):
            items.append((f"example{e}/trace{r}", torch.from_numpy(example.tokens[r].copy())))
    items = items[:limit] if limit else items
    return Inputs("analysis:traces", items, {"examples": examples, "traces": traces})


def inputs_for(loaded: LoadedModel, images: list[str] | None, limit: int | None, examples: int = 16,
               traces: int = 4) -> Inputs:
    """The inputs a model analyses: traces for a recall model, else images."""
    if loaded.family == "recall":
        if images:
            raise AnalysisInputError(f"{loaded.name} reads trace sequences, not images; drop --images")
        return recall_inputs(loaded, examples, traces, limit)
    return image_inputs(images, limit)
