"""``classify:<source>``: a supervised model's own head, top-1 / top-5, as timm's validate.py measures it.

The model's own classifier and its own evaluation preprocessing (timm's ``resolve_data_config`` /
``create_transform`` with the checkpoint's crop percentage and interpolation; a transformers model's
image processor), under the cell's variant. Sources:

- ``folder``: an ImageFolder validation tree (``root/<class>/*`` or ``root/<split>/<class>/*``), class
  folders named by WordNet id (ImageNet), by the head's class names, or by class index (ImageNetV2's
  layout); an ImageNet-ReaL ``real.json`` beside the tree adds ReaL accuracy.
- ``wds``: local WebDataset tar shards (``shards``, a brace/glob pattern) with an image and a label
  member (``label_key``, default ``cls``: a class index or name) per sample.
- ``shapes``: a generated, seeded set of eight shapes in clutter (tasks/shape_classes.py), offline.

Metrics, in percent: ``top1`` (primary), ``top5``, ``mean_class_top1`` (top-1 averaged over classes)
and, with ReaL labels, ``real_top1`` / ``real_top5`` over the images ReaL labels at all. Records keep
each class's top-1 and the preprocessing used under ``details``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fnabench.data.generated import classification as shape_classes
from fnabench.data.label_map import ClassMap, read_real_labels, val_number
from fnabench.data.labelled import IMAGE_SUFFIXES, open_image, stratified_subset
from fnabench.data.webdataset import read_samples, shard_paths
from fnabench.models.loaded import Classifier, LoadedModel
from fnabench.tasks.base import FOLDER, TEXT, Option, Settings, TaskError, check_options, positive_int

SOURCES = ("folder", "wds", "shapes")
TOPK = (1, 5)


@dataclass(frozen=True)
class FileImage:
    """An image file, decoded when opened (picklable for data-loader workers)."""

    path: Path

    def open(self):
        return open_image(self.path)


@dataclass(frozen=True)
class Sample:
    """One evaluation image: how to open it, its dataset class name, and its key (file name or shard key)."""

    image: Any  # FileImage | TarImage | ShapeImage: anything with .open() -> PIL image
    name: str
    key: str


class _Transformed(torch.utils.data.Dataset):
    """Samples → the model's preprocessed tensors, for a DataLoader (its workers decode in parallel)."""

    def __init__(self, samples: Sequence[Sample], transform) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.samples[i].image.open())


# ---------------------------------------------------------------------------------------------
# sources


def folder_samples(root: str | Path, split: str = "val") -> tuple[list[Sample], Path]:
    """Every image under ``root/<class>/`` (or ``root/<split>/<class>/`` when that folder exists), sorted."""
    root = Path(root).expanduser()
    tree = root / split if (root / split).is_dir() else root
    classes = sorted(d for d in tree.iterdir() if d.is_dir())
    samples = [Sample(FileImage(p), d.name, p.name) for d in classes
               for p in sorted(q for q in d.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)]
    if not samples:
        raise TaskError(f"classify:folder: no images in class folders under {str(tree)!r} "
                        f"(accepted: <root>/<class>/*.jpg or <root>/{split}/<class>/*.jpg; suffixes "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    return samples, tree


def wds_samples(pattern: str, label_key: str) -> tuple[list[Sample], Path]:
    """Every sample of the shards ``pattern`` names that has an image and a ``label_key`` member."""
    shards = shard_paths(pattern)
    if not shards:
        raise TaskError(f"classify:wds: shards {pattern!r} match no file")
    samples = [Sample(image, label, key) for image, label, key in read_samples(shards, label_key)]
    if not samples:
        raise TaskError(f"classify:wds: no sample in {len(shards)} shard(s) {pattern!r} has both an image "
                        f"and a .{label_key} member; accepted: WebDataset shards with KEY.jpg + KEY.{label_key}")
    return samples, shards[0].parent


def _real_file(where: Path) -> Path | None:
    """ImageNet-ReaL's ``real.json`` beside a validation tree (in it, or one folder up), if present."""
    return next((p for p in (where / "real.json", where.parent / "real.json") if p.is_file()), None)


# ---------------------------------------------------------------------------------------------
# the task


@dataclass
class Prepared:
    classifier: Classifier
    samples: list[Sample]
    targets: torch.Tensor  # [N] head index of each image's class
    class_names: dict[int, str]  # head index → name of each class present (the head's own label where it has
    # one, so ImageNetV2's folder "0" and ImageNet's n01440764 are the same class), in index order
    real: list[list[int]] | None  # per image: head indices ReaL counts as correct ([] = not labelled)
    allowed: torch.Tensor | None  # [C] bool: the classes that may be predicted (classes = "dataset")


class ClassifyTask:
    """Top-1 / top-5 of a model's own head on a labelled image set, under the patched variant."""

    primary = "top1"
    measures = "logits"  # the runner counts FLOPs and times the classifier's whole forward, head included

    def __init__(self, source: str, *, root: str | None = None, split: str = "val", shards: str | None = None,
                 label_key: str = "cls", per_class: int = 125, limit: int | None = None,
                 real_labels: str | None = None, classes: str = "all", workers: int = 0) -> None:
        if source not in SOURCES:
            raise TaskError(f"unknown classify source {source!r}; accepted: "
                            f"{', '.join(f'classify:{s}' for s in SOURCES)}")
        if source == "folder" and root is None:
            raise TaskError("classify:folder needs option root (an ImageFolder validation tree, <root>/<class>/*); "
                            "set it under [task_options.\"classify:folder\"]")
        if source == "wds" and shards is None:
            raise TaskError("classify:wds needs option shards (a local shard pattern, e.g. "
                            "/data/imagenet-wds/val-{0000..0063}.tar); set it under [task_options.\"classify:wds\"]")
        self.source, self.root, self.split, self.shards, self.label_key = source, root, split, shards, label_key
        self.per_class, self.limit, self.real_labels = per_class, limit, real_labels
        self.restrict, self.workers = classes == "dataset", workers
        self.name = f"classify:{source}"
        self.higher_is_better = {m: True for m in ("top1", "top5", "mean_class_top1", "real_top1", "real_top5")}
        self.proportions = {"top1": ("test", 100.0), "top5": ("test", 100.0),
                            "real_top1": ("real", 100.0), "real_top5": ("real", 100.0)}

    def _samples(self) -> tuple[list[Sample], Path | None]:
        if self.source == "folder":
            return folder_samples(self.root, self.split)
        if self.source == "wds":
            return wds_samples(self.shards, self.label_key)
        drawn = shape_classes.images("val", self.per_class)
        return [Sample(s, s.name, f"{s.name}_{s.seed[-1]:05d}") for s in drawn], None

    def prepare(self, loaded: LoadedModel, settings: Settings) -> Prepared:
        classifier = loaded.extra.get("classifier")
        if classifier is None:
            raise TaskError(f"{self.name}: {loaded.name} has no classification head; accepted: a timm classifier "
                            "(timm:NAME with its pretrained head, timm:local-dir:FOLDER) or a transformers "
                            "*ForImageClassification checkpoint (hf:REPO_ID)")
        samples, where = self._samples()
        cmap = ClassMap(classifier.labels, classifier.num_classes, loaded.name)
        index = cmap.resolve((s.name for s in samples), f"{self.name} ({where or 'generated'})")
        limit = (self.limit or None) if self.limit is not None else settings.limit
        if limit is not None and limit < len(samples):
            codes = {n: i for i, n in enumerate(sorted(index))}
            keep = stratified_subset(np.array([codes[s.name] for s in samples]), limit, settings.seed)
            samples = [samples[i] for i in keep]
        targets = torch.tensor([index[s.name] for s in samples])
        labels = classifier.labels or []
        class_names = {i: (labels[i] if i < len(labels) and labels[i] else n)
                       for n, i in sorted({(s.name, index[s.name]) for s in samples}, key=lambda t: t[1])}
        allowed = None
        if self.restrict:
            allowed = torch.zeros(classifier.num_classes, dtype=torch.bool)
            allowed[list(class_names)] = True
        return Prepared(classifier, samples, targets, class_names, self._real(samples, where, cmap), allowed)

    def _real(self, samples: list[Sample], where: Path | None, cmap: ClassMap) -> list[list[int]] | None:
        path = Path(self.real_labels).expanduser() if self.real_labels else (_real_file(where) if where else None)
        if path is None:
            return None
        labels, to_head = read_real_labels(path), cmap.imagenet_1k()
        out = []
        for s in samples:
            number = val_number(s.key)
            if number is None or not 1 <= number <= len(labels):
                raise TaskError(f"{self.name}: ImageNet-ReaL labels {str(path)!r} need ImageNet validation file "
                                f"names (ILSVRC2012_val_00000001 … {len(labels):08d}); got {s.key!r}")
            out.append([to_head[c] for c in labels[number - 1]])
        return out

    def example_batch(self, prepared: Prepared, settings: Settings) -> torch.Tensor:
        head = prepared.samples[: settings.batch_size]
        return torch.stack([prepared.classifier.transform(s.image.open()) for s in head])

    def forward(self, loaded: LoadedModel, prepared: Prepared | None = None):
        """What the runner measures for a cell: the classifier's logits (head included), not the features."""
        return loaded.extra["classifier"].logits

    def items(self, prepared: Prepared) -> dict[str, int]:
        """Images behind top-1/top-5 (``test``) and behind the ReaL metrics (``real``: those ReaL labels)."""
        out = {"test": len(prepared.samples), "classes": len(prepared.class_names)}
        if prepared.real is not None:
            out["real"] = sum(bool(r) for r in prepared.real)
        return out

    @torch.no_grad()
    def ranked(self, loaded: LoadedModel, prepared: Prepared, settings: Settings) -> torch.Tensor:
        """[N, k] the head's k best classes per image (k = 5, or the class count), best first."""
        loader = torch.utils.data.DataLoader(_Transformed(prepared.samples, prepared.classifier.transform),
                                             batch_size=settings.batch_size, num_workers=self.workers)
        k = min(max(TOPK), prepared.classifier.num_classes)
        out = []
        steps = (len(prepared.samples) + settings.batch_size - 1) // settings.batch_size
        for batch in settings.progress(loader, self.name, steps):
            logits = prepared.classifier.logits(batch.to(device=settings.device, dtype=settings.dtype)).float()
            if not torch.isfinite(logits).all():
                raise FloatingPointError(f"{self.name}: non-finite logits")
            if prepared.allowed is not None:
                logits[:, ~prepared.allowed.to(logits.device)] = -torch.inf
            # stable sort: ties rank the lower class index first, the same on every device
            out.append(torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k].cpu())
        return torch.cat(out)

    def evaluate(self, loaded: LoadedModel, prepared: Prepared, settings: Settings) -> dict[str, Any]:
        return score(self.ranked(loaded, prepared, settings), prepared,
                     {"preprocessing": prepared.classifier.preprocessing})


def score(ranked: torch.Tensor, prepared: Prepared, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics from the ranked predictions; ``details`` (a dict, kept in the record, not a metric) gains
    each class's top-1."""
    hits = ranked == prepared.targets[:, None]
    n = max(len(prepared.targets), 1)
    metrics: dict[str, Any] = {f"top{k}": 100.0 * int(hits[:, :k].any(dim=1).sum()) / n for k in TOPK}
    size = max(prepared.class_names) + 1
    correct = torch.zeros(size).index_add_(0, prepared.targets, hits[:, 0].float())
    counts = torch.bincount(prepared.targets, minlength=size).float()
    per_class = {name: 100.0 * int(correct[i]) / int(counts[i]) for i, name in prepared.class_names.items()}
    metrics["mean_class_top1"] = float(np.mean(list(per_class.values())))
    if prepared.real is not None:
        labelled = [i for i, r in enumerate(prepared.real) if r]
        for k in TOPK:
            correct = sum(any(int(c) in prepared.real[i] for c in ranked[i, :k]) for i in labelled)
            metrics[f"real_top{k}"] = 100.0 * correct / max(len(labelled), 1)
    metrics["details"] = {**(details or {}), "per_class_top1": per_class}
    return metrics


# ---------------------------------------------------------------------------------------------
# options (checked before any model loads)

COMMON = {
    "limit": positive_int(0),  # images, stratified by class; 0 = all (else the sweep's limit)
    "classes": Option(str, "all (every logit competes) or dataset (only the dataset's classes, as for "
                      "ImageNet-A/R)", lambda v: v in ("all", "dataset")),
    "workers": positive_int(0),  # data-loader processes decoding images; 0 = in the main process
}
REAL = {"real_labels": Option(str, "the path of ImageNet-ReaL's real.json", lambda v: Path(v).expanduser().is_file())}
OPTIONS = {
    "folder": {**COMMON, **REAL, "root": FOLDER, "split": TEXT},
    "wds": {**COMMON, **REAL, "label_key": TEXT,
            "shards": Option(str, "a pattern of local .tar shards that exist, e.g. /data/val-{0000..0063}.tar",
                             lambda v: bool(shard_paths(v)))},
    "shapes": {**COMMON, "per_class": positive_int(1)},
}


def make_task(source: str, **options) -> ClassifyTask:
    """Registry factory: ``classify:folder|wds|shapes`` with that source's options."""
    if source not in OPTIONS:
        raise TaskError(f"unknown classify source {source!r}; accepted: "
                        f"{', '.join(f'classify:{s}' for s in SOURCES)}")
    return ClassifyTask(source, **check_options(f"classify:{source}", options, OPTIONS[source]))


make_task.options = {k: v for source in OPTIONS.values() for k, v in source.items()}  # `fnabench list tasks`
