"""open_clip models as fnabench loads them: the factory and cache with the model's own preprocessing and tokenizer,
and the random-init tiny:open_clip."""

from __future__ import annotations

import torch

from fnabench._extras import require
from fnabench.models.loaded import LoadedModel, ModelInputError, describe_load_failure, make_preprocess, split_tag

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _loaded(name: str, model, preprocess, tokenizer, size: int, family: str) -> LoadedModel:
    model.eval()
    return LoadedModel(name, model, preprocess, model.encode_image, size, family,
                       extra={"tokenizer": tokenizer, "encode_text": model.encode_text})


def load_model(spec: str, *, image_size: int | None = None) -> LoadedModel:
    """``open_clip:NAME@TAG`` through open_clip's own factory and cache (no tag: random init)."""
    open_clip = require("open_clip")
    name, tag = split_tag(spec)
    if name not in open_clip.list_models():
        raise ModelInputError(f"open_clip:{spec}: unknown open_clip model; see open_clip.list_models()")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag,
                                                                     force_image_size=image_size)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as err:  # host/hub errors come in many types; one line says what to do
        raise describe_load_failure(f"open_clip:{spec}", err) from None
    size = image_size or _image_size(model)
    return _loaded(f"open_clip:{spec}", model, preprocess, tokenizer, size, "open_clip")


def _image_size(model) -> int:
    size = getattr(model.visual, "image_size", 224)
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def load_tiny(spec: str = "open_clip", *, image_size: int | None = None) -> LoadedModel:
    """``tiny:open_clip``: a small random-initialised (seed 0) CLIP with open_clip's own tokenizer."""
    open_clip = require("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    size = image_size or 64
    vision = CLIPVisionCfg(layers=4, width=128, head_width=32, patch_size=8, image_size=size)
    text = CLIPTextCfg(context_length=32, vocab_size=49408, width=64, heads=2, layers=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = open_clip.CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=32)
    preprocess = make_preprocess(size, OPENAI_MEAN, OPENAI_STD)
    return _loaded("tiny:open_clip", model, preprocess, tokenizer, size, "tiny")
