"""timm ViTs: ``timm.layers.Attention`` (ViT, DeiT, DINOv2-style, with ``fused_attn`` on or off).

Keeps q/k norm, the optional output gate and ``scale_norm``; subclasses that override ``forward``
(RoPE, EVA, ...) are left alone rather than patched wrongly.
"""

from __future__ import annotations

import torch

from .._extras import require
from .core import AttentionKind, BlockKind, BlockSite, Site, install_forward, merge_heads
from .loading import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadedModel,
    ModelInputError,
    describe_load_failure,
    make_preprocess,
    split_tag,
)

LOOKS_FOR = ["timm.layers.Attention"]
BLOCKS = ["timm.models.vision_transformer.Block"]


def _install(site: Site):
    attn = site.module

    def forward(x, attn_mask=None, is_causal=False):
        b, n, _ = x.shape
        gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        out = site.attend(q, k, v, scale=attn.scale, attn_mask=attn_mask)
        out = attn.norm(merge_heads(out))
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out))

    return install_forward(attn, forward)


def kinds() -> list[AttentionKind]:
    Attention = require("timm.layers").Attention

    def matches(m) -> bool:
        return isinstance(m, Attention) and type(m).forward is Attention.forward

    return [AttentionKind("timm.layers.Attention", matches, _install)]


def _install_block(site: BlockSite):
    blk = site.block

    def forward(x, attn_mask=None, is_causal=False):
        site.enter(x)
        kwargs = {"attn_mask": attn_mask} if attn_mask is not None else {}
        x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x), **kwargs)))
        x = site.between(x)
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    return install_forward(blk, forward)


def block_kinds() -> list[BlockKind]:
    Block = require("timm.models.vision_transformer").Block

    def matches(m) -> bool:
        return isinstance(m, Block) and type(m).forward is Block.forward

    return [BlockKind("timm.models.vision_transformer.Block", matches, _install_block)]


# ---------------------------------------------------------------------------------------------
# loading


def _embed(model):
    return lambda x: model.forward_head(model.forward_features(x), pre_logits=True)


def _finish(name: str, model, image_size: int | None, family: str = "timm") -> LoadedModel:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = image_size or model.patch_embed.img_size[0]
    preprocess = make_preprocess(size, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD))
    return LoadedModel(name, model.eval(), preprocess, _embed(model), size, family)


def load_model(spec: str, *, image_size: int | None = None) -> LoadedModel:
    """``timm:NAME[@TAG]``: timm's pretrained weights through its own hub cache; ``@random`` for random init."""
    timm = require("timm")
    name, tag = split_tag(spec)
    full = name if tag in (None, "random") else f"{name}.{tag}"
    kwargs = {"img_size": image_size} if image_size else {}
    if not timm.is_model(name):
        raise ModelInputError(f"timm:{spec}: unknown timm model; list them with timm.list_models('*vit*')")
    try:
        model = timm.create_model(full, pretrained=tag != "random", num_classes=0, **kwargs)
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
