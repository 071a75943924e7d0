"""transformers vision models as fnabench loads them (CLIP, SigLIP, DINOv2 and image classifiers, with their
processor at any size and their labels), and the random-init tiny:hf-* encoders."""

from __future__ import annotations

import inspect
import re

import torch
from torch import nn

from fnabench._extras import require
from fnabench.models.loaded import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Classifier,
    LoadedModel,
    describe_load_failure,
    make_preprocess,
)


def _embedder(model):
    """Final image features of a transformers vision model, at any input size."""
    if hasattr(model, "get_image_features"):  # CLIPModel, SiglipModel: the projected embedding

        def embed(x):
            out = model.get_image_features(pixel_values=x, interpolate_pos_encoding=True)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        return embed
    interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters

    def embed(x):
        out = model(pixel_values=x, interpolate_pos_encoding=True) if interpolate else model(pixel_values=x)
        return out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]

    return embed


def _is_classifier(config) -> bool:
    """A checkpoint saved as an image classifier (``*ForImageClassification``), read off its config."""
    return any(a.endswith("ForImageClassification") for a in getattr(config, "architectures", None) or [])


def load_model(spec: str, *, image_size: int | None = None) -> LoadedModel:
    """``hf:REPO_ID`` (or a local folder): ``AutoModel`` + ``AutoImageProcessor`` through transformers' own
    cache; a checkpoint saved as ``*ForImageClassification`` loads with its head
    (``AutoModelForImageClassification``), and its features are what the head reads."""
    tr = require("transformers")
    try:
        config = tr.AutoConfig.from_pretrained(spec)
        auto = tr.AutoModelForImageClassification if _is_classifier(config) else tr.AutoModel
        model = auto.from_pretrained(spec)
        processor = tr.AutoImageProcessor.from_pretrained(spec)
    except Exception as err:  # host/hub errors come in many types; one line says what to do
        raise describe_load_failure(f"hf:{spec}", err) from None
    loaded = _finish(f"hf:{spec}", model, image_size, getattr(processor, "image_mean", IMAGENET_MEAN),
                     getattr(processor, "image_std", IMAGENET_STD), "hf")
    if _is_classifier(config):
        loaded.embed = _pre_logits(model)
        loaded.extra["classifier"] = classifier(model, processor, loaded.image_size)
    return loaded


def _finish(name, model, image_size, mean, std, family) -> LoadedModel:
    cfg = getattr(model.config, "vision_config", model.config)
    size = image_size or cfg.image_size
    extra = {}
    if hasattr(model, "get_text_features"):
        extra["encode_text"] = model.get_text_features
    return LoadedModel(name, model.eval(), make_preprocess(size, mean, std), _embedder(model), size, family, extra)


# ---------------------------------------------------------------------------------------------
# image classifiers: logits, pre-logits features, the processor at any size, ImageNet labels


def _logits_fn(model):
    """[B, 3, S, S] → [B, classes] logits, interpolating position embeddings where the model can."""
    interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters

    def logits(x):
        return (model(pixel_values=x, interpolate_pos_encoding=True) if interpolate else model(pixel_values=x)).logits

    return logits


def _pre_logits(model):
    """The features a classifier's head reads (the input of its ``classifier`` layer), for feature tasks."""
    head, logits = getattr(model, "classifier", None), _logits_fn(model)
    if not isinstance(head, nn.Module):  # e.g. DeiT with a distillation head: the backbone's own features
        return _embedder(model.base_model)

    def embed(x):
        seen: list[torch.Tensor] = []
        hook = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            logits(x)
        finally:
            hook.remove()
        return seen[-1] if seen[-1].dim() == 2 else seen[-1][:, 0]

    return embed


def _field(sizes, key: str):
    """``sizes[key]`` of a processor's size spec (a dict, or transformers 5's SizeDict)."""
    if sizes is None:
        return None
    return sizes.get(key) if isinstance(sizes, dict) else getattr(sizes, key, None)


class ProcessorTransform:
    """One PIL image → [3, S, S] through a transformers image processor; at a size other than the
    checkpoint's, its resize and crop sizes are scaled by the same factor (aspect and crop ratio kept)."""

    def __init__(self, processor, size: int) -> None:
        self.processor, self.kwargs = processor, {}
        crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
        resize = getattr(processor, "size", None)
        native = next((int(v) for d in (crop, resize) for k in ("height", "shortest_edge")
                       if (v := _field(d, k))), None)
        if native and native != size:
            def scaled(d):
                return {k: round(v * size / native) for k in ("height", "width", "shortest_edge")
                        if (v := _field(d, k))}
            self.kwargs["size"] = scaled(resize)
            if crop is not None:
                self.kwargs["crop_size"] = scaled(crop)

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image.convert("RGB"), return_tensors="pt", **self.kwargs)["pixel_values"][0]

    def describe(self) -> dict:
        p = self.processor
        out = {"library": "transformers", "processor": type(p).__name__}
        for key in ("size", "crop_size"):
            value = self.kwargs.get(key) or getattr(p, key, None)
            if value is not None:
                out[key] = {k: v for k in ("height", "width", "shortest_edge") if (v := _field(value, k))}
        for key in ("do_center_crop", "crop_pct", "resample", "image_mean", "image_std"):
            value = getattr(p, key, None)
            if value is not None:
                out[key] = list(value) if isinstance(value, (tuple, list)) else (
                    value if isinstance(value, (bool, int, float, str)) else str(value))
        return out


_WNID = re.compile(r"n\d{8}")


def _labels(config) -> list[str | None] | None:
    """What each logit means: WordNet ids when the head is ImageNet's (its labels are WordNet ids, or
    ImageNet-1k's class descriptions, or unnamed with 1000 classes; read with timm's ImageNet info when
    timm is installed), else the config's ``id2label`` names; ``None`` when the head names nothing."""
    num = int(config.num_labels)
    names = [str((config.id2label or {}).get(i, "")) for i in range(num)]
    if all(_WNID.fullmatch(n) for n in names):
        return names
    generic = all(n in ("", f"LABEL_{i}") for i, n in enumerate(names))
    try:
        info = require("timm.data").ImageNetInfo("imagenet-1k") if num == 1000 else None
    except ImportError:
        info = None
    if info is not None:
        described = [info.index_to_description(i).lower() for i in range(num)]
        if generic or sum(a.lower() == b for a, b in zip(names, described, strict=True)) >= 0.9 * num:
            return list(info.label_names())
    return None if generic else names


def classifier(model, processor, size: int) -> Classifier:
    """A transformers ``*ForImageClassification`` model's head with its own image processor at ``size`` px."""
    transform = ProcessorTransform(processor, size)
    return Classifier(_logits_fn(model), int(model.config.num_labels), _labels(model.config), transform,
                      transform.describe())


def load_tiny(spec: str, *, image_size: int | None = None) -> LoadedModel:
    """``tiny:hf-clip`` / ``tiny:hf-siglip`` / ``tiny:hf-dinov2``: small random-initialised vision encoders."""
    tr = require("transformers")
    size = image_size or 64
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                  image_size=size, patch_size=8)
    builders = {
        "hf-clip": lambda: tr.CLIPVisionModel(tr.CLIPVisionConfig(**common)),
        "hf-siglip": lambda: tr.SiglipVisionModel(tr.SiglipVisionConfig(**common)),
        "hf-dinov2": lambda: tr.Dinov2Model(tr.Dinov2Config(**common)),
    }
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = builders[spec]()
    return _finish(f"tiny:{spec}", model, size, IMAGENET_MEAN, IMAGENET_STD, "tiny")
