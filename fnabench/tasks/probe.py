"""``knn:<dataset>`` and ``linear:<dataset>``: how well a backbone's frozen features classify, per variant.

k-NN follows DINO: L2-normalised features, the k nearest training images by cosine similarity vote
for their class with weight exp(sim / T). The linear probe is a multinomial logistic regression on
standardised features, fitted full-batch with L-BFGS in float64 (deterministic; no scikit-learn).
Both embed the train AND test images under the cell's variant, since the variant changes the
backbone. Metrics: top-1 and top-5 accuracy in percent; ``top1`` is primary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fnabench.data.labelled import DATASETS, Item, LabelledSplit, load_split, open_image
from fnabench.models.linear_probe import fit_linear_probe
from fnabench.models.loaded import LoadedModel
from fnabench.tasks.base import FOLDER, Option, Settings, TaskError, batches, check_options, number, positive_int

# ---------------------------------------------------------------------------------------------
# classifiers on features (pure tensor functions)


def knn_votes(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int,
              k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """[N_test, C] class votes: the k most cosine-similar training features each add exp(sim / T)."""
    train, test = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    k = min(k, train.shape[0])
    out = []
    for part in batches(test, chunk):
        sims, idx = (part @ train.T).topk(k, dim=1)
        votes = torch.zeros(part.shape[0], num_classes)
        out.append(votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp()))
    return torch.cat(out)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``top{k}`` accuracy in percent; ties in score rank the lower class index first (deterministic)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    hits = order == labels[:, None]
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).sum().item() / max(len(labels), 1) for k in ks}






# ---------------------------------------------------------------------------------------------
# images → features


class ImageSet:
    """Images for one model: preprocessed once and held when ``cache`` is set, else preprocessed per batch."""

    def __init__(self, items: Sequence[Item], preprocess: Callable[[Any], torch.Tensor], cache: bool) -> None:
        self.items, self.preprocess = list(items), preprocess
        self.tensor = self._load(self.items) if cache else None

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, items: Sequence[Item]) -> torch.Tensor:
        return torch.stack([self.preprocess(open_image(item)) for item in items])

    def batches(self, size: int) -> Iterator[torch.Tensor]:
        """[b, 3, S, S] batches in order."""
        for start in range(0, len(self), size):
            if self.tensor is not None:
                yield self.tensor[start:start + size]
            else:
                yield self._load(self.items[start:start + size])

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` images as one batch."""
        return next(self.batches(n))


@torch.no_grad()
def embed_set(loaded: LoadedModel, images: ImageSet, settings: Settings, desc: str) -> torch.Tensor:
    """[N, D] float32 CPU features of every image, in batches on the settings' device and dtype."""
    steps = (len(images) + settings.batch_size - 1) // settings.batch_size
    out = [loaded.embed(batch.to(device=settings.device, dtype=settings.dtype)).float().cpu()
           for batch in settings.progress(images.batches(settings.batch_size), desc, steps)]
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# the tasks


@dataclass
class Prepared:
    split: LabelledSplit
    train: ImageSet
    test: ImageSet
    train_labels: torch.Tensor
    test_labels: torch.Tensor


class ProbeTask:
    """Shared part of the k-NN and linear probes: data, splits, features under the variant, metrics."""

    kind = "probe"
    primary = "top1"

    def __init__(self, dataset: str, *, root: str | None = None, test_fraction: float = 0.5,
                 limit: int | None = None, cache_mb: float = 512) -> None:
        if dataset not in DATASETS:
            raise TaskError(f"unknown {self.kind} dataset {dataset!r}; accepted: "
                            f"{', '.join(f'{self.kind}:{d}' for d in DATASETS)}")
        if dataset == "folder" and root is None:
            raise TaskError(f"{self.kind}:folder needs option root (a folder with train/<class>/ and val/<class>/); "
                            f"set it under [task_options.\"{self.kind}:folder\"]")
        self.dataset, self.root, self.test_fraction = dataset, root, test_fraction
        self.limit, self.cache_mb = limit, cache_mb
        self.name = f"{self.kind}:{dataset}"
        self.higher_is_better = {"top1": True, "top5": True}
        self.proportions = {"top1": ("test", 100.0), "top5": ("test", 100.0)}  # percent of the test images

    def _limit(self, settings: Settings) -> int | None:
        """The task's own ``limit`` option wins (0 = all images); else the sweep's."""
        if self.limit is not None:
            return self.limit or None
        return settings.limit

    def prepare(self, loaded: LoadedModel, settings: Settings) -> Prepared:
        split = load_split(self.dataset, root=self.root, test_fraction=self.test_fraction,
                           limit=self._limit(settings), seed=settings.seed)
        size = loaded.image_size
        cache = (len(split.train) + len(split.test)) * 3 * size * size * 4 <= self.cache_mb * 2**20
        return Prepared(split, ImageSet(split.train, loaded.preprocess, cache),
                        ImageSet(split.test, loaded.preprocess, cache),
                        torch.as_tensor(split.train_labels), torch.as_tensor(split.test_labels))

    def example_batch(self, prepared: Prepared, settings: Settings) -> torch.Tensor:
        return prepared.test.head(settings.batch_size)

    def items(self, prepared: Prepared) -> dict[str, int]:
        """How many images stand behind the metrics: accuracy is over ``test``; ``train`` are the references."""
        return {"test": len(prepared.test), "train": len(prepared.train)}

    def evaluate(self, loaded: LoadedModel, prepared: Prepared, settings: Settings) -> dict[str, float]:
        train = embed_set(loaded, prepared.train, settings, f"{self.name} train")
        test = embed_set(loaded, prepared.test, settings, f"{self.name} test")
        if not (torch.isfinite(train).all() and torch.isfinite(test).all()):
            raise FloatingPointError(f"{self.name}: non-finite features")
        scores = self.classify(train, prepared.train_labels, test, len(prepared.split.classes))
        return topk_accuracy(scores, prepared.test_labels, (1, 5))  # top5 is 100 with fewer than 6 classes

    def classify(self, train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                 num_classes: int) -> torch.Tensor:
        raise NotImplementedError


class KnnTask(ProbeTask):
    """DINO-style weighted k-NN on frozen, L2-normalised features."""

    kind = "knn"

    def __init__(self, dataset: str, *, k: int = 20, temperature: float = 0.07, **common) -> None:
        super().__init__(dataset, **common)
        self.k, self.temperature = k, temperature

    def classify(self, train, train_labels, test, num_classes):
        return knn_votes(train, train_labels, test, num_classes, self.k, self.temperature)


class LinearTask(ProbeTask):
    """Logistic-regression probe on frozen, standardised features."""

    kind = "linear"

    def __init__(self, dataset: str, *, weight_decay: float = 1e-3, max_iter: int = 100, **common) -> None:
        super().__init__(dataset, **common)
        self.weight_decay, self.max_iter = weight_decay, max_iter

    def classify(self, train, train_labels, test, num_classes):
        probe = fit_linear_probe(train, train_labels, num_classes, self.weight_decay, self.max_iter)
        return probe.scores(test)


#: options both probes take (checked before any model loads)
COMMON_OPTIONS: dict[str, Option] = {
    "root": FOLDER,
    "test_fraction": number(0, inclusive=False, high=1),
    "limit": positive_int(0),  # images in all, train and test together; 0 = all
    "cache_mb": number(0),
}
KNN_OPTIONS = {**COMMON_OPTIONS, "k": positive_int(1), "temperature": number(0, inclusive=False)}
LINEAR_OPTIONS = {**COMMON_OPTIONS, "weight_decay": number(0), "max_iter": positive_int(1)}


def make_knn_task(dataset: str, **options) -> KnnTask:
    """Registry factory: ``knn:<digits|mnist|folder>``; options k, temperature, root, test_fraction, limit, cache_mb."""
    return KnnTask(dataset, **check_options(f"knn:{dataset}", options, KNN_OPTIONS))


make_knn_task.options = KNN_OPTIONS  # what `fnabench list tasks` shows


def make_linear_task(dataset: str, **options) -> LinearTask:
    """Registry factory: ``linear:<digits|mnist|folder>``; options weight_decay, max_iter, root, test_fraction,
    limit, cache_mb."""
    return LinearTask(dataset, **check_options(f"linear:{dataset}", options, LINEAR_OPTIONS))


make_linear_task.options = LINEAR_OPTIONS
