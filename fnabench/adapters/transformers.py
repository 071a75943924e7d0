"""transformers vision encoders: CLIP, SigLIP and DINOv2 attention.

Where the attention class dispatches through ``AttentionInterface`` (transformers ≥ 4.48), the
patch registers an ``"fnabench"`` attention function once and points the tower's config at it
(restoring the previous implementation on removal); the module's weights and forward stay
untouched. Otherwise the module's forward is swapped for one that projects q, k, v itself.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .core import AttentionKind, Site, install_forward, merge_heads, split_heads

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
    from transformers import AttentionInterface

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

