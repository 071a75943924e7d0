"""transformers attention: CLIP, SigLIP and DINOv2 encoders, and decoder-only LMs (GPT-2, Llama,
Qwen2/3, Mistral, OLMo, OLMo-2).

Where the attention class dispatches through ``AttentionInterface`` (transformers ≥ 4.48), the
patch registers an ``"fnabench"`` attention function once and points the tower's config at it
(restoring the previous implementation on removal); the module's weights and forward stay
untouched. Otherwise the module's forward is swapped for one that projects q, k, v itself.

Decoders: the ``"fnabench"`` implementation gets sdpa's mask function, so a decoder layer sees
either no mask (plain causal) or a 4-D boolean one. Plain causal prefill runs the variant causally
(variants/causal.py); any other mask (left padding) runs exact attention or is refused by an
approximation. Decoding steps attend exactly to what the KV cache holds; with ``cache=landmark``
the prefill's cache is replaced, layer by layer, by the landmark keys with their Nyström values Ṽ
plus the real tokens after the last landmark (kv_cache.py).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from fnabench._errors import UserError
from fnabench._extras import require
from fnabench.patching.kv_cache import compress_layer
from fnabench.patching.sites import (
    AttentionKind,
    BlockKind,
    BlockSite,
    HostAdapter,
    Site,
    install_forward,
    merge_heads,
    split_heads,
)
from fnabench.variants.variant import ATTENTION_RANGE

IMPLEMENTATION = "fnabench"
#: "auto" uses AttentionInterface where the class dispatches through it; "swap" forces the module swap
ROUTE = "auto"
ENCODER_CLASSES = ("CLIPAttention", "SiglipAttention", "Dinov2Attention", "Dinov2SelfAttention",
                   "Dinov2WithRegistersAttention", "Dinov2WithRegistersSelfAttention", "ViTAttention",
                   "ViTSelfAttention", "DeiTAttention", "DeiTSelfAttention")
DECODER_CLASSES = ("GPT2Attention", "LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention",
                   "OlmoAttention", "Olmo2Attention",
                   # Qwen2-VL's language model (multimodal rotary positions applied before the dispatch)
                   "Qwen2VLAttention", "Qwen2_5_VLAttention")
CLASSES = ENCODER_CLASSES + DECODER_CLASSES
LOOKS_FOR = [f"transformers {name}" for name in (*CLASSES[:3], *DECODER_CLASSES)]
#: encoder layers a token flow patches: (norm before attention, attention, norm before MLP, MLP) by name;
#: DINOv2's layers also scale each branch (layer_scale1/2) and drop paths
ENCODER_LAYERS = {"CLIPEncoderLayer": ("layer_norm1", "self_attn", "layer_norm2", "mlp"),
                  "SiglipEncoderLayer": ("layer_norm1", "self_attn", "layer_norm2", "mlp"),
                  "Dinov2Layer": ("norm1", "attention", "norm2", "mlp"),
                  "Dinov2WithRegistersLayer": ("norm1", "attention", "norm2", "mlp")}
#: pre-norm decoder layers a token flow (FastV-style pruning) patches:
#: input_layernorm → self_attn → residual, post_attention_layernorm → mlp → residual
DECODER_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                  "OlmoDecoderLayer")
BLOCKS = [f"transformers {name}" for name in (*ENCODER_LAYERS, *DECODER_LAYERS)]


class PaddingMaskError(UserError, ValueError):
    """An approximation asked to honour a padding mask it cannot honour."""


def is_decoder_attention(module: nn.Module) -> bool:
    """A causal self-attention layer of a decoder-only LM (not cross-attention)."""
    return type(module).__name__ in DECODER_CLASSES and bool(getattr(module, "is_causal", False))


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, H_kv, N, d] → [B, heads, N, d]: grouped-query attention's key/value heads, one per query head."""
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _is_plain_causal(mask: torch.Tensor | None, n: int) -> bool:
    """True for no mask or a boolean [.., n, n] mask that is exactly lower-triangular in every row."""
    if mask is None:
        return True
    if mask.dtype != torch.bool or mask.shape[-1] != n or mask.shape[-2] != n:
        return False
    return bool((mask == torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()).all())


def _decoder_attention(site: Site, module, query, key, value, attention_mask, scaling):
    """Prefill: the variant, causally; decode steps: exact attention over the cache's keys."""
    heads = query.shape[1]
    key, value = _repeat_kv(key, heads), _repeat_kv(value, heads)
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len < kv_len:  # decoding (or chunked prefill) on a cache: exact over what it holds
        if attention_mask is None and q_len > 1:
            attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        with torch.profiler.record_function(ATTENTION_RANGE):
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    if _is_plain_causal(attention_mask, q_len):
        state = site.state
        state.prefill.pop(site.layer, None)
        out = site.attend(query, key, value, scale=scaling, causal=True)
        cache = module.__dict__.get("_fnabench_cache")
        entry = state.prefill.get(site.layer)
        if cache is not None and entry is not None and site.variant.core["cache"] == "landmark":
            compress_layer(cache, module.layer_idx, *entry)
        return out
    try:
        return site.attend(query, key, value, scale=scaling, attn_mask=attention_mask)
    except ValueError as err:
        raise PaddingMaskError(
            f"{site.variant.core.name} cannot honour the padding mask of a left-padded batch in {site.name}; "
            "accepted: unpadded input (one sequence, or sequences of equal length) or exact attention"
        ) from err


def fnabench_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       **_kwargs):
    """The ``AttentionInterface`` function: [B, H, N, d] in, ([B, N, H, d], None) out, like sdpa's."""
    site = module.__dict__.get("_fnabench_site")
    decoder = is_decoder_attention(module)
    if site is None:  # a module sharing the config that fnabench did not patch: plain exact attention
        if decoder:
            key, value = _repeat_kv(key, query.shape[1]), _repeat_kv(value, query.shape[1])
        causal = decoder and attention_mask is None and query.shape[2] == key.shape[2] > 1
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling,
                                             is_causal=causal)
    elif decoder:
        out = _decoder_attention(site, module, query, key, value, attention_mask, scaling)
    else:
        out = site.attend(query, key, value, scale=scaling, attn_mask=attention_mask)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    tr = require("transformers")
    if tr.AttentionInterface._global_mapping.get(IMPLEMENTATION) is not fnabench_attention:
        tr.AttentionInterface.register(IMPLEMENTATION, fnabench_attention)
    masks = tr.masking_utils.AttentionMaskInterface
    if IMPLEMENTATION not in masks._global_mapping:  # decoders build sdpa's masks for fnabench
        masks.register(IMPLEMENTATION, tr.masking_utils.sdpa_mask)


def dispatches_through_interface(module: nn.Module) -> bool:
    """True when the class's forward looks its attention function up in ALL_ATTENTION_FUNCTIONS."""
    forward = type(module).forward
    while hasattr(forward, "__wrapped__"):  # deprecation decorators wrap the real forward
        forward = forward.__wrapped__
    return "ALL_ATTENTION_FUNCTIONS" in forward.__code__.co_names and hasattr(module, "config")


# configs whose implementation fnabench replaced → (original implementation, number of sites)
_ORIGINAL: dict[int, list] = {}


def _cache_hook(module, args, kwargs):
    """Remember the KV cache a decoder layer is called with (the attention function is not given it)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and hasattr(cache, "self_attention_cache"):
        cache = cache.self_attention_cache
    module.__dict__["_fnabench_cache"] = cache


def _install_interface(site: Site):
    _register()
    config = site.module.config
    entry = _ORIGINAL.setdefault(id(config), [config._attn_implementation, 0])
    entry[1] += 1
    config._attn_implementation = IMPLEMENTATION
    hook = site.module.register_forward_pre_hook(_cache_hook, with_kwargs=True) if is_decoder_attention(
        site.module) else None

    def undo() -> None:
        if hook is not None:
            hook.remove()
            site.module.__dict__.pop("_fnabench_cache", None)
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
    if is_decoder_attention(site.module):
        if not dispatches_through_interface(site.module):
            raise NotImplementedError(f"{site.name}: {type(site.module).__name__} does not dispatch through "
                                      "AttentionInterface; upgrade transformers to >= 4.48")
        return _install_interface(site)
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
        return (cls.__name__ in CLASSES and cls.__module__.startswith("transformers.")
                and not getattr(m, "is_cross_attention", False))

    def matches_decoder(m) -> bool:
        return matches(m) and is_decoder_attention(m)

    return [AttentionKind("transformers decoder attention", matches_decoder, _install),
            AttentionKind("transformers attention", matches, _install)]



def _install_block(site: BlockSite):
    layer = site.block
    norm1, attn, norm2, mlp = (getattr(layer, n) for n in ENCODER_LAYERS[type(layer).__name__])
    scale1, scale2 = (getattr(layer, n, nn.Identity()) for n in ("layer_scale1", "layer_scale2"))
    drop = getattr(layer, "drop_path", nn.Identity())
    old_api = "output_attentions" in inspect.signature(type(layer).forward).parameters  # transformers 4.x: tuples

    def forward(hidden_states, *args, **kwargs):
        site.enter(hidden_states)
        if old_api:  # 4.x: (hidden_states, attention_mask[, causal_attention_mask], output_attentions)
            kwargs.pop("output_attentions", None)
        mask = kwargs.pop("attention_mask", args[0] if args else None)
        if type(layer).__name__.startswith("Dinov2") and old_api:
            out = attn(norm1(hidden_states))
        else:
            out = attn(norm1(hidden_states), attention_mask=mask)
        out = out[0] if isinstance(out, tuple) else out
        x = site.between(hidden_states + drop(scale1(out)))
        x = x + drop(scale2(mlp(norm2(x))))
        return (x,) if old_api else x

    return install_forward(layer, forward)


def _install_decoder_block(site: BlockSite):
    layer = site.block

    def forward(hidden_states, *args, **kwargs):
        if args:  # transformers passes everything but the hidden states by keyword; an old caller: the mask
            kwargs = {"attention_mask": args[0], **kwargs}
        site.enter(hidden_states)
        narrow = getattr(site.state.flow, "inputs_for", None)
        if narrow is not None:  # positions and masks follow the tokens a flow kept
            kwargs = narrow(hidden_states.shape[1], kwargs)
        out = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
        x = site.between(hidden_states + (out[0] if isinstance(out, tuple) else out))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    return install_forward(layer, forward)


def block_kinds() -> list[BlockKind]:
    def matches(m) -> bool:
        cls = type(m)
        return cls.__name__ in ENCODER_LAYERS and cls.__module__.startswith("transformers.")

    def matches_decoder(m) -> bool:
        cls = type(m)
        return cls.__name__ in DECODER_LAYERS and cls.__module__.startswith("transformers.")

    return [BlockKind("transformers encoder layer", matches, _install_block),
            BlockKind("transformers decoder layer", matches_decoder, _install_decoder_block)]


def _image_token_id(config) -> int | None:
    for key in ("image_token_id", "image_token_index"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def install_owner(model: nn.Module, states: dict) -> list:
    """On a multimodal model whose language model is patched: a pre-hook on the module that receives
    ``input_ids`` (LLaVA's ``model.model``) marks the image tokens of each forward in the text tower's state
    (``guarantee=text``, FastV-style pruning). Returns the undo callables."""
    state = states.get("text")
    if state is None:
        return []
    undo = []
    for module in model.modules():
        token = _image_token_id(getattr(module, "config", None))
        if token is None or not hasattr(module, "language_model") or type(module).__name__.endswith("Generation"):
            continue

        def mark(_module, args, kwargs, token=token):
            ids = kwargs.get("input_ids", args[0] if args else None)
            state.image_tokens = None if ids is None else ids == token

        def clear(*_args):  # a later call of the language model on its own must not see stale marks
            state.image_tokens = None

        undo.append(module.register_forward_pre_hook(mark, with_kwargs=True).remove)
        undo.append(module.register_forward_hook(clear).remove)
    if undo:
        undo.append(lambda: setattr(state, "image_tokens", None))
    return undo


ADAPTER = HostAdapter("transformers", tuple(LOOKS_FOR), kinds, blocks=tuple(BLOCKS), block_kinds=block_kinds,
                      install_owner=install_owner)
