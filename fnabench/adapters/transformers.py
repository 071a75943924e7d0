"""transformers vision encoders: CLIP, SigLIP and DINOv2 attention.

Where the attention class dispatches through ``AttentionInterface`` (transformers ≥ 4.48), the
patch registers an ``"fnabench"`` attention function once and points the tower's config at it
(restoring the previous implementation on removal); the module's weights and forward stay
untouched. Otherwise the module's forward is swapped for one that projects q, k, v itself.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .._extras import require
from .core import AttentionKind, Site, install_forward, merge_heads, split_heads
from .loading import IMAGENET_MEAN, IMAGENET_STD, LoadedModel, describe_load_failure, make_preprocess

IMPLEMENTATION = "fnabench"
#: "auto" uses AttentionInterface where the class dispatches through it; "swap" forces the module swap
ROUTE = "auto"
CLASSES = ("CLIPAttention", "SiglipAttention", "Dinov2Attention", "Dinov2SelfAttention",
           "Dinov2WithRegistersAttention", "Dinov2WithRegistersSelfAttention")
LOOKS_FOR = [f"transformers {name}" for name in CLASSES[:3]]


def fnabench_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       **_kwargs):
    """The ``AttentionInterface`` function: [B, H, N, d] in, ([B, N, H, d], None) out, like sdpa's."""
    site = module.__dict__.get("_fnabench_site")
    if site is None:  # a module sharing the config that fnabench did not patch: plain exact attention
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    else:
        out = site.attend(query, key, value, scale=scaling, attn_mask=attention_mask)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    AttentionInterface = require("transformers").AttentionInterface

    if AttentionInterface._global_mapping.get(IMPLEMENTATION) is not fnabench_attention:
        AttentionInterface.register(IMPLEMENTATION, fnabench_attention)


def dispatches_through_interface(module: nn.Module) -> bool:
    """True when the class's forward looks its attention function up in ALL_ATTENTION_FUNCTIONS."""
    code = type(module).forward.__code__
    return "ALL_ATTENTION_FUNCTIONS" in code.co_names and hasattr(module, "config")


# configs whose implementation fnabench replaced → (original implementation, number of sites)
_ORIGINAL: dict[int, list] = {}


def _install_interface(site: Site):
    _register()
    config = site.module.config
    entry = _ORIGINAL.setdefault(id(config), [config._attn_implementation, 0])
    entry[1] += 1
    config._attn_implementation = IMPLEMENTATION

    def undo() -> None:
        entry[1] -= 1
        if entry[1] == 0:
            config._attn_implementation = entry[0]
            _ORIGINAL.pop(id(config), None)

    return undo


def _install_swap(site: Site):
    attn = site.module
    out_proj = getattr(attn, "out_proj", None) or attn.o_proj
    heads = getattr(attn, "num_heads", None) or attn.num_attention_heads
    scale = getattr(attn, "scale", None) or attn.scaling

    def forward(hidden_states, attention_mask=None, *_args, **_kwargs):
        q, k, v = (split_heads(proj(hidden_states), heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        out = site.attend(q, k, v, scale=scale, attn_mask=attention_mask)
        return out_proj(merge_heads(out)), None

    return install_forward(attn, forward)


def _install(site: Site):
    if ROUTE == "swap" or not dispatches_through_interface(site.module):
        if not all(hasattr(site.module, p) for p in ("q_proj", "k_proj", "v_proj")):
            raise NotImplementedError(
                f"{site.name}: {type(site.module).__name__} neither dispatches through AttentionInterface "
                "nor has q_proj/k_proj/v_proj; upgrade transformers to >= 4.48"
            )
        return _install_swap(site)
    return _install_interface(site)


def kinds() -> list[AttentionKind]:
    def matches(m) -> bool:
        cls = type(m)
        return cls.__name__ in CLASSES and cls.__module__.startswith("transformers.")

    return [AttentionKind("transformers attention", matches, _install)]



# ---------------------------------------------------------------------------------------------
# loading


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


def load_model(spec: str, *, image_size: int | None = None) -> LoadedModel:
    """``hf:REPO_ID``: ``AutoModel`` + ``AutoImageProcessor`` through transformers' own cache."""
    tr = require("transformers")
    try:
        model = tr.AutoModel.from_pretrained(spec)
        processor = tr.AutoImageProcessor.from_pretrained(spec)
    except Exception as err:  # host/hub errors come in many types; one line says what to do
        raise describe_load_failure(f"hf:{spec}", err) from None
    return _finish(f"hf:{spec}", model, image_size, getattr(processor, "image_mean", IMAGENET_MEAN),
                   getattr(processor, "image_std", IMAGENET_STD), "hf")


def _finish(name, model, image_size, mean, std, family) -> LoadedModel:
    cfg = getattr(model.config, "vision_config", model.config)
    size = image_size or cfg.image_size
    extra = {}
    if hasattr(model, "get_text_features"):
        extra["encode_text"] = model.get_text_features
    return LoadedModel(name, model.eval(), make_preprocess(size, mean, std), _embedder(model), size, family, extra)


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
