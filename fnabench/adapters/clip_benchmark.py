"""CLIP_benchmark, both ways round: its datasets and metrics for fnabench, and a ``fnabench`` model type for its CLI.

Everything that imports ``clip_benchmark`` lives here.

* For fnabench's ``clip_benchmark:<dataset>`` task: :func:`build_dataset` (their builder, made to fail
  with one line instead of downloading), :func:`zeroshot_retrieval` / :func:`zeroshot_classification`
  (their ``evaluate`` functions, with their progress bars routed through fnabench's).
* For CLIP_benchmark's users: :func:`main`, the ``fnabench-clip-benchmark`` console script. It is
  CLIP_benchmark's own CLI with one more ``--model_type fnabench`` that takes ``--variant SPEC [SPEC ...]``
  (and ``--image_size``), and writes CLIP_benchmark's usual JSON with the variant recorded in it.
  CLIP_benchmark has no plugin mechanism, so the model type is injected into its ``TYPE2FUNC`` /
  ``MODEL_TYPES``, and the two CLI arguments are added to its ``eval`` parser before it parses.

Metric names are CLIP_benchmark's. Their scores are ``texts @ images.T``:
``image_retrieval_recall@k`` ranks *images* for each *caption* (text→image, T2I),
``text_retrieval_recall@k`` ranks *captions* for each *image* (image→text, I2T).

CLIP_benchmark 1.6.2's top-k ``accuracy`` fails under NumPy >= 2.4 (LAION-AI/CLIP_benchmark#147); both
paths swap in :func:`topk_accuracy` only where theirs raises.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import re
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fnabench._errors import UserError
from fnabench._extras import MissingExtraError, require
from fnabench._version import __version__
from fnabench.models.loaded import LoadedModel, ModelLoadError, describe_load_failure
from fnabench.models.registry import load_model
from fnabench.patching.core import PatchHandle, UnsupportedModelError, patch
from fnabench.variants import SpecError, parse_variant

MODEL_TYPE = "fnabench"
TASK_TYPES = ("zeroshot_retrieval", "zeroshot_classification")
#: the ``--output`` CLIP_benchmark uses by default, and ours for ``--model_type fnabench`` (one file per variant)
DEFAULT_OUTPUT = "{dataset}_{pretrained}_{model}_{language}_{task}.json"
FNABENCH_OUTPUT = "{dataset}_{pretrained}_{model}_{language}_{task}_{variant}.json"
#: ``pretrained`` recorded for fnabench model names (``tiny:open_clip``), whose name already says what is loaded
NO_PRETRAINED = "-"


class DatasetError(UserError, ValueError):
    """A CLIP_benchmark dataset that cannot be built: unknown name, not on disk, bad split."""


# ---------------------------------------------------------------------------------------------
# datasets


class _WouldDownload(Exception):
    """Raised in place of the shell command CLIP_benchmark's builder runs to fetch a missing dataset."""


@contextlib.contextmanager
def _swap(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``obj.name = value`` for the duration of the block, then restore it."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def dataset_names() -> list[str]:
    """Dataset names CLIP_benchmark's collections list (its builder accepts a few more, and tfds/ vtab/ wds/)."""
    builder = require("clip_benchmark.datasets.builder")
    names = {n for names in builder.dataset_collection.values() for n in names}
    return sorted(names | {"dummy"})


def default_task(dataset: str) -> str:
    """CLIP_benchmark's task for a dataset: ``zeroshot_retrieval`` for caption sets, else classification."""
    builder = require("clip_benchmark.datasets.builder")
    return builder.get_dataset_default_task(dataset.removeprefix("wds/"))


def collate_fn(dataset: str) -> Callable:
    """CLIP_benchmark's collate function for a dataset (captions stay lists of strings)."""
    return require("clip_benchmark.datasets.builder").get_dataset_collate_fn(dataset)


def build_dataset(name: str, root: str, transform: Callable, *, split: str = "test", task: str,
                  language: str = "en", annotation_file: str | None = None,
                  custom_classname_file: str | None = None, custom_template_file: str | None = None) -> Any:
    """CLIP_benchmark's ``build_dataset``, offline: a dataset not on disk is a one-line :class:`DatasetError`.

    Their builder shells out to ``wget``/``unzip``/``kaggle`` for missing data whatever ``download``
    says; that call is replaced by an error for the duration, and torchvision sets get ``download=False``.
    """
    builder = require("clip_benchmark.datasets.builder")

    def refuse(command, *args, **kwargs):
        raise _WouldDownload(str(command))

    try:
        with _swap(builder, "call", refuse):
            return builder.build_dataset(
                dataset_name=name, root=root, transform=transform, split=split, download=False,
                annotation_file=annotation_file or "", language=language, task=task,
                custom_classname_file=custom_classname_file, custom_template_file=custom_template_file)
    except _WouldDownload as err:
        raise DatasetError(f"dataset {name!r} not found under {root!r} (CLIP_benchmark's builder would fetch it: "
                           f"{str(err)[:120]}); put the data there or set dataset_root") from None
    except ValueError as err:
        if "Unsupported dataset" in str(err):
            raise DatasetError(f"unknown CLIP_benchmark dataset {name!r}; accepted: {', '.join(dataset_names())}, "
                               "tfds/<name>, vtab/<name>, wds/<name> (and 'shapes', generated offline)") from None
        raise DatasetError(f"dataset {name!r} under {root!r}: {_first_line(err)}") from None
    except (SystemExit, Exception) as err:  # their builder asserts, exits, or lets torchvision raise
        raise DatasetError(f"dataset {name!r} under {root!r}: {_first_line(err)}") from None


def captions_of(dataset: Any, index: int) -> list[str]:
    """The captions of item ``index`` without decoding its image where the dataset allows it."""
    base, i = dataset, index
    while isinstance(base, torch.utils.data.Subset):
        base, i = base.dataset, base.indices[i]
    if hasattr(base, "_load_target") and hasattr(base, "ids"):  # torchvision CocoCaptions
        target = base._load_target(base.ids[i])
    elif isinstance(getattr(base, "data", None), list) and base.data and isinstance(base.data[0], tuple):
        target = base.data[i][1]  # CLIP_benchmark's Flickr: (file, captions)
    else:
        return list(dataset[index][1])
    if getattr(base, "target_transform", None) is not None:
        target = base.target_transform(target)
    return list(target)


# ---------------------------------------------------------------------------------------------
# metrics


@contextlib.contextmanager
def _progress(modules: Iterable[Any], progress: Callable | None, desc: str) -> Iterator[None]:
    """Route the ``tqdm(...)`` calls inside CLIP_benchmark's metric modules through fnabench's progress."""
    if progress is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(_swap(module, "tqdm", lambda it, *a, **k: progress(it, desc, None)))
        yield


def zeroshot_retrieval(model: Any, dataloader: Iterable, tokenizer: Callable, *, device: str, amp: bool,
                       recall_k: Sequence[int] = (1, 5, 10), progress: Callable | None = None,
                       desc: str = "retrieval") -> dict[str, float]:
    """CLIP_benchmark's ``zeroshot_retrieval.evaluate``: ``image_retrieval_recall@k`` (text→image) and
    ``text_retrieval_recall@k`` (image→text) for each k; ``model`` needs ``encode_image``/``encode_text``."""
    metric = require("clip_benchmark.metrics.zeroshot_retrieval")
    with _progress([metric], progress, desc):
        return metric.evaluate(model, dataloader, tokenizer, device=device, amp=amp, recall_k_list=list(recall_k))


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """Fraction of rows whose target is among the ``k`` largest logits, for each k (CLIP_benchmark's contract)."""
    top = logits.topk(max(topk), dim=1).indices
    hit = top == target.view(-1, 1)
    return [hit[:, :k].any(dim=1).sum().item() / len(target) for k in topk]


def _accuracy_fix(metric: types.ModuleType) -> contextlib.AbstractContextManager:
    """Swap in :func:`topk_accuracy` where CLIP_benchmark's own ``accuracy`` fails.

    CLIP_benchmark 1.6.2 calls ``float()`` on a one-element 1-d NumPy array, which NumPy >= 2.4
    refuses (``TypeError: only 0-dimensional arrays can be converted to Python scalars``;
    LAION-AI/CLIP_benchmark#147). Where theirs still works it is left alone.
    """
    try:
        metric.accuracy(torch.tensor([[0.0, 1.0]]), torch.tensor([1]), topk=(1,))
        return contextlib.nullcontext()
    except TypeError:
        return _swap(metric, "accuracy", topk_accuracy)


def zeroshot_classification(model: Any, dataloader: Any, tokenizer: Callable, classnames: Any, templates: Any, *,
                            device: str, amp: bool, progress: Callable | None = None,
                            desc: str = "classification") -> dict[str, float]:
    """CLIP_benchmark's ``zeroshot_classification.evaluate``: acc1, acc5, mean_per_class_recall
    (or mean_average_precision for multi-label sets)."""
    metric = require("clip_benchmark.metrics.zeroshot_classification")
    with _progress([metric], progress, desc), _accuracy_fix(metric):
        return metric.evaluate(model, dataloader, tokenizer, classnames, templates, device=device, amp=amp)


# ---------------------------------------------------------------------------------------------
# the ``fnabench`` model type for CLIP_benchmark's CLI


class ClipView(nn.Module):
    """A :class:`LoadedModel` as the CLIP-like module CLIP_benchmark expects (``encode_image``/``encode_text``)."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__()
        self.model = loaded.model
        self._loaded = loaded

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._loaded.embed(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._loaded.extra["encode_text"](tokens)


def text_side(loaded: LoadedModel) -> tuple[Callable, Callable]:
    """(tokenizer, encode_text) of a CLIP-like loaded model, or a one-line :class:`ModelLoadError`."""
    tokenizer, encode_text = loaded.extra.get("tokenizer"), loaded.extra.get("encode_text")
    if tokenizer is None or encode_text is None:
        missing = [k for k in ("tokenizer", "encode_text") if loaded.extra.get(k) is None]
        raise ModelLoadError(f"{loaded.name}: no text side for CLIP_benchmark (LoadedModel.extra lacks "
                             f"{', '.join(missing)}); use a CLIP model, e.g. open_clip:ViT-B-16@laion2b_s34b_b88k")
    return tokenizer, encode_text


@dataclass
class _Current:
    """What the running ``eval`` asked for: the fnabench loader reads it (their loader signature has no room)."""

    variant: str = "exact"
    image_size: int | None = None
    handle: PatchHandle | None = None


_CURRENT: _Current | None = None



def load_for_clip_benchmark(model_name: str, pretrained: str | None = None, cache_dir: str | None = None,
                            device: str | torch.device = "cpu") -> tuple[nn.Module, Callable, Callable]:
    """``TYPE2FUNC['fnabench']``: load, patch with the current ``--variant``, return (model, transform, tokenizer).

    ``--model`` is an open_clip architecture (with ``--pretrained`` a tag, as for ``--model_type open_clip``)
    or a fnabench model name such as ``tiny:open_clip`` or ``open_clip:ViT-L-14@openai`` (``--pretrained`` ignored).
    """
    current = _CURRENT or _Current()
    if ":" in model_name:
        try:
            loaded = load_model(model_name, image_size=current.image_size)
        except KeyError as err:  # the registry's RegistryError: an unknown name, with the accepted ones
            raise ModelLoadError(str(err)) from None
        tokenizer, _ = text_side(loaded)
        model, transform, target = ClipView(loaded), loaded.preprocess, loaded.model
    else:
        open_clip = require("open_clip")
        try:
            model, _, transform = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, cache_dir=cache_dir, force_image_size=current.image_size)
            tokenizer, target = open_clip.get_tokenizer(model_name), model
        except Exception as err:  # host/hub errors come in many types; one line says what to do
            raise describe_load_failure(f"open_clip:{model_name}@{pretrained}", err) from None
    model = model.to(device).eval()
    current.handle = patch(target, current.variant)
    return model, transform, tokenizer


def register_model_type() -> None:
    """Add ``fnabench`` to CLIP_benchmark's ``TYPE2FUNC`` and to the very ``MODEL_TYPES`` list its CLI uses."""
    models = require("clip_benchmark.models")
    models.TYPE2FUNC[MODEL_TYPE] = load_for_clip_benchmark
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)


def _slug(spec: str) -> str:
    """A variant's short form as a file-name part: ``fna:m=64,layers=-6:`` → ``fna-layers=-6-m=64``."""
    return re.sub(r"[^A-Za-z0-9=._+-]+", "-", parse_variant(spec).short).strip("-")


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    """Our two options, added to CLIP_benchmark's ``eval`` sub-parser."""
    group = parser.add_argument_group("fnabench (with --model_type fnabench)")
    group.add_argument("--variant", nargs="+", default=None, metavar="SPEC",
                       help="attention variant spec(s) patched into the model, e.g. 'fna:m=64,layers=-6:' "
                            "(default: exact); one run and one JSON per spec")
    group.add_argument("--image_size", type=int, default=None,
                       help="input resolution (position embeddings interpolated), e.g. 896")


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def _checked(ns: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Validate our options after parsing: specs parse, they come with our model type, outputs do not collide."""
    if getattr(ns, "which", None) != "eval":
        return ns
    if ns.model_type != MODEL_TYPE:
        if ns.variant is not None or ns.image_size is not None:
            parser.error(f"--variant/--image_size need --model_type {MODEL_TYPE}")
        return ns
    try:
        ns.variant = [parse_variant(spec).canonical for spec in (ns.variant or ["exact"])]
    except SpecError as err:
        parser.error(str(err))
    if ns.output == DEFAULT_OUTPUT:
        ns.output = FNABENCH_OUTPUT
    elif len(ns.variant) > 1 and "{variant}" not in ns.output:
        parser.error("several --variant specs need '{variant}' in --output (one JSON per variant)")
    ns.fnabench_pretrained_given = any(a.split("=")[0] in ("--pretrained", "--pretrained_model") for a in argv)
    return ns


def _parser_class(argv: Sequence[str]) -> type[argparse.ArgumentParser]:
    """An ``ArgumentParser`` that, as CLIP_benchmark's top-level parser, grows our options and parses ``argv``."""

    class Parser(argparse.ArgumentParser):
        def parse_args(self, args=None, namespace=None):
            evaluate = _subparser(self, "eval")
            if evaluate is None:  # not the top-level parser
                return super().parse_args(args, namespace)
            _add_arguments(evaluate)
            ns = super().parse_args(list(argv) if args is None else args, namespace)
            return _checked(ns, evaluate, argv)

    return Parser


def _json_shim(dump_extra: Callable[[], dict]) -> types.ModuleType:
    """``json`` for CLIP_benchmark's CLI, whose ``dump`` adds our fields to the result it writes."""
    shim = types.ModuleType("json")
    shim.__dict__.update(json.__dict__)

    def dump(obj, fp, *args, **kwargs):
        if isinstance(obj, dict) and "metrics" in obj:
            obj = {**obj, **dump_extra()}
        return json.dump(obj, fp, *args, **kwargs)

    shim.dump = dump
    return shim


def _run_wrapper(original: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], Any]:
    """CLIP_benchmark's per-(model, dataset, language) ``run``, once per ``--variant`` for our model type."""

    def run(args: argparse.Namespace):
        global _CURRENT
        if args.model_type != MODEL_TYPE:
            return original(args)
        result = None
        for spec in args.variant:
            one = copy.copy(args)
            if ":" in one.model and not args.fnabench_pretrained_given:
                one.pretrained = NO_PRETRAINED
            one.output = one.output.replace("{variant}", _slug(spec))
            _CURRENT = _Current(variant=spec, image_size=args.image_size)
            try:
                result = original(one)
            finally:
                if _CURRENT.handle is not None:
                    _CURRENT.handle.remove()
                _CURRENT = None
        return result

    return run


def _dump_extra() -> dict:
    if _CURRENT is None:
        return {}
    variant = parse_variant(_CURRENT.variant)
    return {"model_type": MODEL_TYPE, "variant": variant.canonical, "variant_short": variant.short,
            "image_size": _CURRENT.image_size, "fnabench_version": __version__}


def main(argv: Sequence[str] | None = None) -> int:
    """CLIP_benchmark's CLI (``eval``, ``build``) plus ``--model_type fnabench``; the console script is
    ``fnabench.cli.clip_benchmark_cmd:main``, which also lets ``--model`` take fnabench model names."""

    try:
        cli = require("clip_benchmark.cli")
        register_model_type()
        argv = sys.argv[1:] if argv is None else list(argv)
        shim = types.ModuleType("argparse")
        shim.__dict__.update(argparse.__dict__)
        shim.ArgumentParser = _parser_class(argv)
        with _swap(cli, "argparse", shim), _swap(cli, "run", _run_wrapper(cli.run)), \
                _swap(cli, "json", _json_shim(_dump_extra)), _accuracy_fix(cli.zeroshot_classification):
            cli.main()
    except (MissingExtraError, ModelLoadError, UnsupportedModelError, SpecError) as err:
        print(f"fnabench-clip-benchmark: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
