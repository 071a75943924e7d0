"""Classifiers trained here: a linear head fitted on a real frozen backbone, saved as a normal timm checkpoint.

``offline:dinov2-s-shapes`` is DINOv2 ViT-S/14 (the real weights of ``offline:dinov2-s``) with a linear
head for the eight classes of the generated shapes set (tasks/shape_classes.py), fitted on the set's
train split (no image of the ``classify:shapes`` evaluation split) and written with timm's own
``save_for_hf`` (config.json with the classes and preprocessing, model.safetensors), so timm loads it
like any checkpoint (``timm:local-dir:FOLDER``). It is trained on first use, in a few CPU minutes, and
cached under ``$FNABENCH_CACHE/classifiers`` by a hash of everything that makes it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fnabench._extras import require
from fnabench.data.cache import cache_root, content_hash
from fnabench.data.generated import classification as shape_classes
from fnabench.models import timm as timm_loader
from fnabench.models.linear_probe import fit_linear_probe
from fnabench.models.loaded import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, ModelInputError
from fnabench.models.offline.dinov2_s import build_timm, exported_state_dict, onnx_path

#: bump when the recipe below changes, so a cached head is retrained
VERSION = 1
#: the checkpoint's own evaluation preprocessing (timm's data config), as timm's ImageNet ViTs use
DATA_CONFIG = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
               "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
SHAPES_RECIPE = {"backbone": "offline:dinov2-s", "train_per_class": 100, "weight_decay": 1e-2, "max_iter": 200,
                 "seed": 0, "data_config": DATA_CONFIG, "shapes_version": shape_classes.VERSION, "version": VERSION}


def head_from_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
                    max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear head ([C, D] weight, [C] bias) equal to a logistic-regression probe fitted on standardised
    features (fnabench.tasks.probe: deterministic L-BFGS), with the standardisation folded into it."""
    probe = fit_linear_probe(features, labels, num_classes, weight_decay, max_iter)
    weight = probe.weight / probe.std[:, None]  # [D, C]: ((x - mean) / std) @ W = x @ (W / std) - mean @ (W / std)
    bias = probe.bias - probe.mean @ weight
    return weight.T.float().contiguous(), bias.float()


@torch.no_grad()
def pre_logits(model, transform, images: Sequence[Any], batch_size: int = 16) -> torch.Tensor:
    """[N, D] what a timm model's head reads, for images (anything with ``.open()`` → PIL) under ``transform``."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(item.open()) for item in images[start:start + batch_size]])
        out.append(model.forward_head(model.forward_features(batch), pre_logits=True).float())
    return torch.cat(out)


def fit_timm_classifier(model, classes: Sequence[str], images: Sequence[Any], labels: Sequence[int], *,
                        data_config: dict | None = None, weight_decay: float = 1e-2, max_iter: int = 200,
                        tag: str = "fnabench") -> Any:
    """Give a headless timm model a fitted linear head for ``classes`` and the checkpoint config that goes
    with it (label names, evaluation preprocessing); the backbone is untouched. Returns the model."""
    data = require("timm.data")
    config = {**DATA_CONFIG, **(data_config or {})}
    transform = data.create_transform(**config)
    feats = pre_logits(model.eval(), transform, images)
    weight, bias = head_from_probe(feats, torch.as_tensor(list(labels)), len(classes), weight_decay, max_iter)
    model.reset_classifier(len(classes))
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    model.pretrained_cfg = {**model.pretrained_cfg, **config, "tag": tag, "num_classes": len(classes),
                            "label_names": list(classes), "hf_hub_id": None, "license": None}
    return model.eval()


def save_timm_classifier(model, folder: str | Path) -> Path:
    """Write ``model`` with timm's ``save_for_hf`` (config.json + model.safetensors) into ``folder``, atomically."""
    timm_models = require("timm.models")
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = model.pretrained_cfg
    try:
        timm_models.save_for_hf(model, str(tmp), model_config={"label_names": list(cfg["label_names"])},
                                data_config={k: cfg[k] for k in DATA_CONFIG}, safe_serialization=True)
        if folder.exists():  # written meanwhile by another process: keep one complete copy
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def shapes_folder(recipe: dict | None = None) -> Path:
    """Where the checkpoint of ``offline:dinov2-s-shapes`` made by ``recipe`` is cached (made or not)."""
    recipe = {**SHAPES_RECIPE, **(recipe or {})}
    return cache_root() / "classifiers" / f"dinov2-s-shapes-v{VERSION}-{content_hash(recipe, 10, default=list)}"


def shapes_classifier_folder(recipe: dict | None = None) -> Path:
    """The cached checkpoint folder of ``offline:dinov2-s-shapes``, trained now if it is not there."""
    recipe = {**SHAPES_RECIPE, **(recipe or {})}
    folder = shapes_folder(recipe)
    if (folder / "config.json").is_file():
        return folder
    size = recipe["data_config"]["input_size"][-1]
    model = build_timm(exported_state_dict(str(onnx_path())), size)
    train = shape_classes.images("train", recipe["train_per_class"], seed=recipe["seed"])
    fit_timm_classifier(model, shape_classes.CLASSES, train, [s.label for s in train],
                        data_config=recipe["data_config"], weight_decay=recipe["weight_decay"],
                        max_iter=recipe["max_iter"], tag=f"fnabench-shapes-v{VERSION}")
    return save_timm_classifier(model, folder)


def load_model(spec: str, *, image_size: int | None = None) -> LoadedModel:
    """``offline:dinov2-s-shapes``: DINOv2-S with its trained shapes head, loaded by timm from the cache."""
    if spec != "dinov2-s-shapes":
        raise ModelInputError(f"unknown trained classifier offline:{spec}; accepted: offline:dinov2-s-shapes")
    loaded = timm_loader.load_model(f"local-dir:{shapes_classifier_folder()}", image_size=image_size)
    loaded.name = f"offline:{spec}"
    return loaded
