"""timm models as fnabench loads them: hub or local checkpoints with their own head and preprocessing, and the
random-init tiny: ViTs."""

from __future__ import annotations

from pathlib import Path

import torch

from fnabench._extras import require
from fnabench.models.loaded import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Classifier,
    LoadedModel,
    ModelInputError,
    describe_load_failure,
    make_preprocess,
    split_tag,
)


def _embed(model):
    return lambda x: model.forward_head(model.forward_features(x), pre_logits=True)


def _labels(model) -> list[str | None] | None:
    """What each head index means: the checkpoint's ``label_names`` (after its ``label_offset``), else the
    ImageNet subset timm infers from the class count (WordNet ids), else unknown."""
    data = require("timm.data")
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    names, offset = cfg.get("label_names"), int(cfg.get("label_offset") or 0)
    if not names:
        subset = data.infer_imagenet_subset(model)
        if subset is None:
            return None
        names = data.ImageNetInfo(subset).label_names()
        offset = model.num_classes - len(names) if model.num_classes > len(names) else offset
    pairs = names.items() if isinstance(names, dict) else enumerate(names)
    labels: list[str | None] = [None] * model.num_classes
    for i, name in pairs:
        if 0 <= int(i) + offset < model.num_classes:
            labels[int(i) + offset] = str(name)
    return labels


def classifier(model, size: int) -> Classifier | None:
    """The model's own head with timm's evaluation transform at ``size`` px (``resolve_data_config`` and
    ``create_transform``, as timm's validate.py with ``--img-size``: crop_pct and interpolation from the
    checkpoint's config); ``None`` for a headless model."""
    if not getattr(model, "num_classes", 0):
        return None
    data = require("timm.data")
    config = data.resolve_data_config({"input_size": (3, size, size)}, model=model)
    described = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}
    return Classifier(model, int(model.num_classes), _labels(model), data.create_transform(**config),
                      {"library": "timm", **described})


def _finish(name: str, model, image_size: int | None, family: str = "timm") -> LoadedModel:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = image_size or model.patch_embed.img_size[0]
    preprocess = make_preprocess(size, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
    head = classifier(model, size) if family == "timm" else None
    return LoadedModel(name, model.eval(), preprocess, _embed(model), size, family,
                       {"classifier": head} if head is not None else {})


#: timm's own model sources: ``local-dir:FOLDER`` (a saved model: config.json + weights) and ``hf-hub:REPO``
SOURCES = ("local-dir:", "hf-hub:")


def load_model(spec: str, *, image_size: int | None = None) -> LoadedModel:
    """``timm:NAME[@TAG]``: timm's pretrained weights through its own hub cache, head included (features
    skip it); ``@random`` for random init; ``timm:local-dir:FOLDER`` for a checkpoint saved with timm's
    ``save_for_hf`` (its config.json says the architecture, classes and preprocessing)."""
    timm = require("timm")
    kwargs = {"img_size": image_size} if image_size else {}
    if spec.startswith(SOURCES):
        full, pretrained = spec, True
        folder = Path(spec.partition(":")[2]).expanduser()
        if spec.startswith("local-dir:") and not (folder / "config.json").is_file():
            raise ModelInputError(f"timm:{spec}: {str(folder)!r} holds no config.json; accepted: a folder written "
                                  "by timm.models.save_for_hf (config.json + model.safetensors)")
    else:
        name, tag = split_tag(spec)
        full, pretrained = (name if tag in (None, "random") else f"{name}.{tag}"), tag != "random"
        if not timm.is_model(name):
            raise ModelInputError(f"timm:{spec}: unknown timm model; list them with timm.list_models('*vit*')")
    try:
        model = timm.create_model(full, pretrained=pretrained, **kwargs)
    except Exception as err:  # host/hub errors come in many types; one line says what to do
        raise describe_load_failure(f"timm:{spec}", err) from None
    return _finish(f"timm:{spec}", model, image_size)


TINY = {
    # name: (timm architecture, kwargs) — random-init stand-ins for tests and offline demos
    "vit": ("vit_small_patch16_224", {"embed_dim": 192, "depth": 6, "num_heads": 3}),
    "dinov2": ("vit_small_patch14_reg4_dinov2", {"embed_dim": 96, "depth": 4, "num_heads": 3}),
}


def load_tiny(spec: str, *, image_size: int | None = None) -> LoadedModel:
    """``tiny:vit`` / ``tiny:dinov2``: small random-initialised (seed 0) timm ViTs; no download."""
    timm = require("timm")
    arch, kwargs = TINY[spec]
    size = image_size or 224
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=size, **kwargs)
        # random init attends almost uniformly; sharpen q/k so approximations have something to miss
        with torch.no_grad():
            for blk in model.blocks:
                blk.attn.qkv.weight[: 2 * blk.attn.qkv.out_features // 3].mul_(2.0)
    return _finish(f"tiny:{spec}", model, size, family="tiny")
