"""``clip_benchmark:<dataset>``: zero-shot retrieval or classification with CLIP_benchmark's own data and metrics.

The dataset comes from CLIP_benchmark's ``build_dataset`` (``dataset_root`` as a task option; nothing
is downloaded), the numbers from its own ``zeroshot_retrieval.evaluate`` / ``zeroshot_classification.evaluate``,
so a record here equals the JSON of ``fnabench-clip-benchmark eval --model_type fnabench`` for the same cell.

The text side (caption embeddings, or the per-template class-name embeddings that make the zero-shot
classifier) is encoded once per model in :meth:`ClipBenchmarkTask.prepare`, with exact attention, in
the very chunks CLIP_benchmark's functions encode them; every variant's :meth:`~ClipBenchmarkTask.evaluate`
serves those embeddings back to the metric function through a stand-in tokenizer and ``encode_text``.
Only a variant that patches the text tower (``tower=text|all``) re-encodes the text under that variant.

``clip_benchmark:shapes`` is a generated offline caption set (:mod:`fnabench.data.generated.retrieval`) written in
CLIP_benchmark's ``mscoco_captions`` layout and read through the same builder.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fnabench.adapters import clip_benchmark as cb
from fnabench.data.generated import retrieval as shapes
from fnabench.models.loaded import LoadedModel, ModelLoadError
from fnabench.patching.core import HANDLE_ATTR
from fnabench.tasks.base import FLAG, TEXT, Option, Settings, TaskError, check_options, positive_int

RETRIEVAL, CLASSIFICATION = "zeroshot_retrieval", "zeroshot_classification"
_TASK_ALIASES = {"retrieval": RETRIEVAL, "classification": CLASSIFICATION, RETRIEVAL: RETRIEVAL,
                 CLASSIFICATION: CLASSIFICATION}
_RECALL_K = Option((int, list), "an integer >= 1 or a list of them",
                   lambda v: all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                 for k in (v if isinstance(v, list) else [v])) and v != [])
#: task options, checked before any model loads; the names are CLIP_benchmark's own
OPTIONS: dict[str, Option] = {
    "dataset_root": TEXT, "language": TEXT, "task": TEXT, "split": TEXT, "annotation_file": TEXT,
    "recall_k": _RECALL_K, "amp": FLAG, "num_workers": positive_int(0), "custom_classname_file": TEXT,
    "custom_template_file": TEXT, "num_images": positive_int(1), "shapes_px": positive_int(8),
    "shapes_seed": positive_int(0),
}


class TextCache:
    """Text embeddings computed once, handed to CLIP_benchmark's metric code in the order it asks for them.

    :meth:`tokenizer` stands in for the real tokenizer: it checks that the texts asked for are the next
    ones cached and returns their positions; :meth:`encode_text` returns the cached rows.
    """

    def __init__(self, texts: list[str], embeddings: torch.Tensor) -> None:
        self.texts, self.embeddings, self.cursor = texts, embeddings, 0

    def rewound(self) -> TextCache:
        """A fresh reader over the same embeddings (one per evaluation)."""
        return TextCache(self.texts, self.embeddings)

    def tokenizer(self, texts: Sequence[str]) -> torch.Tensor:
        start, stop = self.cursor, self.cursor + len(texts)
        if list(texts) != self.texts[start:stop]:
            raise RuntimeError(f"text cache out of step at position {start}: CLIP_benchmark asked for "
                               f"{list(texts)[:1]!r}, cached {self.texts[start:start + 1]!r}")
        self.cursor = stop
        return torch.arange(start, stop)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings[ids.cpu()].to(ids.device)

    @property
    def finished(self) -> bool:
        return self.cursor == len(self.texts)


class _ClipModel:
    """What CLIP_benchmark's metric functions call: the (patched) image tower and the cached text side."""

    def __init__(self, encode_image: Callable[[torch.Tensor], torch.Tensor], text: TextCache) -> None:
        self.encode_image, self.encode_text = encode_image, text.encode_text


class _Subset(torch.utils.data.Subset):
    """A subset that still answers ``classes`` / ``templates`` like the dataset it comes from."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("dataset", "indices"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


@dataclass
class Prepared:
    dataset: Any  # CLIP_benchmark's dataset (or a seeded subset of it), transform = the model's preprocess
    chunks: list[list[str]]  # the texts, in the chunks CLIP_benchmark's metric function encodes them
    text: TextCache  # their embeddings under exact attention
    builder_name: str


def _text_patched(model: torch.nn.Module) -> bool:
    """True when the patch on ``model`` (the runner's variant) touches the text tower."""
    handle = model.__dict__.get(HANDLE_ATTR)
    return handle is not None and handle.active and "text" in handle.variant.towers()


class ClipBenchmarkTask:
    """Zero-shot retrieval (caption sets) or classification through CLIP_benchmark.

    Retrieval records ``image_retrieval_recall@k`` and ``text_retrieval_recall@k`` for each k in
    ``recall_k``, named as CLIP_benchmark names them: *image retrieval* = text→image (T2I: each caption
    ranks the images), *text retrieval* = image→text (I2T: each image ranks the captions). The primary
    metric is ``image_retrieval_recall@1`` (T2I R@1): the number the FNA authors' retrieval notebook leads
    with, and with five captions per image it averages over five times more queries than I2T, so it
    moves least by chance. Classification records acc1, acc5 (dropped when there are fewer than 5
    classes: CLIP_benchmark reports NaN) and mean_per_class_recall; acc1 is primary.
    """

    def __init__(self, dataset: str, *, dataset_root: str | None = None, language: str = "en",
                 task: str | None = None, split: str = "test", annotation_file: str | None = None,
                 recall_k: Sequence[int] = (1, 5, 10), amp: bool = False, num_workers: int = 0,
                 custom_classname_file: str | None = None, custom_template_file: str | None = None,
                 num_images: int = 50, shapes_px: int = 96, shapes_seed: int = 0) -> None:
        if not dataset:
            raise TaskError("clip_benchmark needs a dataset: clip_benchmark:<name>, e.g. clip_benchmark:shapes")
        if dataset.startswith("wds/"):
            raise TaskError(f"clip_benchmark:{dataset}: webdataset sets are not supported by this task "
                            "(use fnabench-clip-benchmark); accepted: map-style datasets of CLIP_benchmark's builder")
        self.dataset = dataset
        self.name = f"clip_benchmark:{dataset}"
        self.builder_name = "mscoco_captions" if dataset == "shapes" else dataset
        if task is None:
            task = RETRIEVAL if dataset == "shapes" else cb.default_task(self.builder_name)
        if task not in _TASK_ALIASES:
            raise TaskError(f"{self.name}: task {task!r} is not supported; accepted: {', '.join(_TASK_ALIASES)}")
        self.task = _TASK_ALIASES[task]
        ks = [recall_k] if isinstance(recall_k, int) else list(recall_k)
        if not ks or not all(isinstance(k, int) and k >= 1 for k in ks):
            raise TaskError(f"{self.name}: recall_k must be integers >= 1, got {recall_k!r}")
        self.recall_k = ks
        self.dataset_root, self.language, self.split = dataset_root, language, split
        self.annotation_file, self.amp, self.num_workers = annotation_file, bool(amp), int(num_workers)
        self.custom_classname_file, self.custom_template_file = custom_classname_file, custom_template_file
        self.num_images, self.shapes_px, self.shapes_seed = num_images, shapes_px, shapes_seed
        if self.task == RETRIEVAL:
            self.primary = f"image_retrieval_recall@{1 if 1 in ks else min(ks)}"
            names = [f"{d}_retrieval_recall@{k}" for k in ks for d in ("image", "text")]
            # CLIP_benchmark reports fractions: T2I over the captions, I2T over the images
            self.proportions = {f"{d}_retrieval_recall@{k}": (over, 1.0) for k in ks
                                for d, over in (("image", "texts"), ("text", "test"))}
        else:
            self.primary = "acc1"
            names = ["acc1", "acc5", "mean_per_class_recall", "mean_average_precision"]
            self.proportions = {"acc1": ("test", 1.0), "acc5": ("test", 1.0)}
        self.higher_is_better = dict.fromkeys(names, True)

    # -----------------------------------------------------------------------------------------

    def _root(self) -> str:
        if self.dataset == "shapes":
            try:
                return str(shapes.ensure(self.dataset_root, self.num_images, self.shapes_px, self.shapes_seed))
            except TaskError as err:
                raise TaskError(f"clip_benchmark: {err}") from None
        root = self.dataset_root or "root"  # CLIP_benchmark's default; a template like theirs: "data/{dataset}"
        return root.format(dataset=self.dataset, dataset_cleaned=self.dataset.replace("/", "-"))

    def _build(self, transform: Callable, settings: Settings) -> Any:
        quiet = contextlib.redirect_stdout(io.StringIO()) if settings.quiet else contextlib.nullcontext()
        try:
            with quiet:  # pycocotools and the builder print to stdout
                ds = cb.build_dataset(
                    self.builder_name, self._root(), transform, split=self.split, task=self.task,
                    language=self.language, annotation_file=self.annotation_file,
                    custom_classname_file=self.custom_classname_file, custom_template_file=self.custom_template_file)
        except cb.DatasetError as err:
            raise TaskError(f"clip_benchmark: {err}") from None
        if self.task == CLASSIFICATION and not (getattr(ds, "classes", None) and getattr(ds, "templates", None)):
            raise TaskError(f"{self.name}: the dataset has no class names/templates for zero-shot classification; "
                            f"accepted: task = {RETRIEVAL!r} for caption sets")
        if settings.limit is not None and settings.limit < len(ds):
            gen = torch.Generator().manual_seed(settings.seed)
            keep = torch.randperm(len(ds), generator=gen)[: settings.limit].sort().values.tolist()
            ds = _Subset(ds, keep)
        return ds

    def _chunks(self, ds: Any, settings: Settings) -> list[list[str]]:
        """The texts, grouped as CLIP_benchmark's metric function tokenizes and encodes them."""
        if self.task == RETRIEVAL:  # all captions of one image batch at a time
            size, n = settings.batch_size, len(ds)
            return [[c for i in range(start, min(start + size, n)) for c in cb.captions_of(ds, i)]
                    for start in range(0, n, size)]
        templates = ds.templates  # one chunk per class: its templates filled in (or its own prompts)
        return [list(templates[c]) if isinstance(templates, dict) else [t.format(c=c) for t in templates]
                for c in ds.classes]

    @torch.no_grad()
    def _encode(self, loaded: LoadedModel, chunks: list[list[str]], settings: Settings, desc: str) -> TextCache:
        """Encode every chunk the way CLIP_benchmark does (same batches, same autocast); kept on the CPU."""
        try:
            tokenizer, encode_text = cb.text_side(loaded)
        except ModelLoadError as err:
            raise TaskError(str(err)) from None
        device_type = torch.device(settings.device).type
        out = []
        for texts in settings.progress(chunks, desc, len(chunks)):
            tokens = tokenizer(texts).to(settings.device)
            with torch.autocast(device_type, enabled=self.amp):
                out.append(self._widen(encode_text(tokens)).cpu())
        return TextCache([t for chunk in chunks for t in chunk], torch.cat(out))

    def _widen(self, features: torch.Tensor) -> torch.Tensor:
        """Float32 features from a float16/bfloat16 model, so scores and the classifier matmul are not half precision.

        Under ``amp`` they are left as autocast made them: that is what CLIP_benchmark's own run computes.
        """
        return features if self.amp else features.float()

    def prepare(self, loaded: LoadedModel, settings: Settings) -> Prepared:
        """Build the dataset with the model's preprocessing and encode the text side once, exact attention."""
        ds = self._build(loaded.preprocess, settings)
        chunks = self._chunks(ds, settings)
        return Prepared(ds, chunks, self._encode(loaded, chunks, settings, f"{self.name}: text"), self.builder_name)

    def items(self, prepared: Prepared) -> dict[str, int]:
        """Images (the I2T and classification queries) and texts (the T2I queries, or the class prompts)."""
        return {"test": len(prepared.dataset), "texts": len(prepared.text.texts)}

    def example_batch(self, prepared: Prepared, settings: Settings) -> torch.Tensor:
        n = min(settings.batch_size, len(prepared.dataset))
        return torch.stack([prepared.dataset[i][0] for i in range(n)])

    def evaluate(self, loaded: LoadedModel, prepared: Prepared, settings: Settings) -> dict[str, float]:
        """CLIP_benchmark's metric on the patched image tower and the cached (or, for text variants, fresh) text."""
        if _text_patched(loaded.model):
            text = self._encode(loaded, prepared.chunks, settings, f"{self.name}: text (variant)")
        else:
            text = prepared.text.rewound()

        def encode_image(images: torch.Tensor) -> torch.Tensor:
            return self._widen(loaded.embed(images.to(device=settings.device, dtype=settings.dtype)))

        model = _ClipModel(encode_image, text)
        loader = torch.utils.data.DataLoader(prepared.dataset, batch_size=settings.batch_size, shuffle=False,
                                             num_workers=self.num_workers,
                                             collate_fn=cb.collate_fn(prepared.builder_name))
        device_type = torch.device(settings.device).type  # what torch.autocast inside their code accepts
        if self.task == RETRIEVAL:
            metrics = cb.zeroshot_retrieval(model, loader, text.tokenizer, device=device_type, amp=self.amp,
                                            recall_k=self.recall_k, progress=settings.progress, desc=self.name)
        else:
            ds = prepared.dataset
            metrics = cb.zeroshot_classification(model, loader, text.tokenizer, ds.classes, ds.templates,
                                                 device=device_type, amp=self.amp, progress=settings.progress,
                                                 desc=self.name)
            if "mean_average_precision" in metrics:
                self.primary = "mean_average_precision"
        if not text.finished:
            raise RuntimeError(f"{self.name}: CLIP_benchmark used {text.cursor} of {len(text.texts)} cached texts")
        return {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}


def make_task(dataset: str, **options: Any) -> ClipBenchmarkTask:
    """Registry factory: ``clip_benchmark:<dataset>`` with task options (``dataset_root``, ``task``, ...)."""
    return ClipBenchmarkTask(dataset, **check_options(f"clip_benchmark:{dataset}", options, OPTIONS))


make_task.options = OPTIONS  # what `fnabench list tasks` shows
