"""timm ViTs: ``timm.layers.Attention`` (ViT, DeiT, DINOv2-style, with ``fused_attn`` on or off).

Keeps q/k norm, the optional output gate and ``scale_norm``; subclasses that override ``forward``
(RoPE, EVA, ...) are left alone rather than patched wrongly.
"""

from __future__ import annotations

import torch

from fnabench._extras import require
from fnabench.patching.sites import AttentionKind, BlockKind, BlockSite, HostAdapter, Site, install_forward, merge_heads

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


ADAPTER = HostAdapter("timm", tuple(LOOKS_FOR), kinds, blocks=tuple(BLOCKS), block_kinds=block_kinds)
