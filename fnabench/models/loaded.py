"""What every model loader returns, shared preprocessing, and the one-line load errors.

Loaders live in their host's adapter module (host imports stay there); this module is host-free.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fnabench._errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelLoadError(UserError, RuntimeError):
    """A model that cannot be loaded: unknown name, weights not cached offline, missing extra."""


class ModelInputError(ModelLoadError):
    """A model asked for something it cannot be (an unknown name, an image size it cannot take): a
    mistake in what the user asked, caught before a sweep runs, unlike weights missing from a cache."""


@dataclass
class LoadedModel:
    """A model ready to evaluate: the module to patch, its preprocessing and its feature function.

    ``embed(images)`` maps a [B, 3, S, S] batch to final features [B, D] (the pooled image
    embedding); ``extra`` carries host-specific parts (an open_clip tokenizer, a text tower).
    """

    name: str
    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    embed: Callable[[torch.Tensor], torch.Tensor]
    image_size: int
    family: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> LoadedModel:
        self.model.to(device=device, dtype=dtype)
        return self


@dataclass
class Classifier:
    """A model's own classification head, as ``LoadedModel.extra["classifier"]`` (for ``classify:*`` tasks).

    ``logits`` maps a [B, 3, S, S] batch (made by ``transform``) to [B, num_classes]; ``labels`` names
    each head index (WordNet ids for ImageNet heads, else the class names the checkpoint gives; ``None``
    where a head does not say, and for an index with no class such as a background logit);
    ``transform`` is the model's own evaluation preprocessing of one PIL image (resize, crop
    percentage, interpolation, normalisation), and ``preprocessing`` says in a dict what it does.
    """

    logits: Callable[[torch.Tensor], torch.Tensor]
    num_classes: int
    labels: list[str | None] | None
    transform: Callable[[Any], torch.Tensor]
    preprocessing: dict[str, Any]


def make_preprocess(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Callable[[Any], torch.Tensor]:
    """PIL image → [3, size, size] float tensor: RGB, shorter side resized (bicubic), centre crop, normalised."""
    from PIL import Image

    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def preprocess(image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
        arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (arr - mean_t) / std_t

    return preprocess


def set_offline(offline: bool = True) -> None:
    """Switch the hub libraries to offline mode (fail fast instead of retrying for ~45 s)."""
    if not offline:
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:  # already-imported hub client reads its constant at import time
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def describe_load_failure(name: str, err: BaseException) -> ModelLoadError:
    """Turn a host library's download/cache failure into one line saying what to do."""
    text = " ".join(str(err).split())
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hub_words = ("offline", "connect", "resolve", "download", "cache", "hub", "LocalEntryNotFound", "404")
    if any(w.lower() in (type(err).__name__ + text).lower() for w in hub_words):
        where = "the hub cannot be reached (offline mode)" if offline else "downloading them failed"
        return ModelLoadError(
            f"{name}: pretrained weights are not in the local cache and {where}; fetch them once on a "
            f"connected machine (same cache dir), or use a random-init 'tiny:*' model ({type(err).__name__})"
        )
    return ModelLoadError(f"{name}: cannot load ({type(err).__name__}: {text[:200]})")


def split_tag(spec: str) -> tuple[str, str | None]:
    """'NAME@TAG' → ('NAME', 'TAG'); 'NAME' → ('NAME', None)."""
    name, _, tag = spec.partition("@")
    return name, (tag or None)
