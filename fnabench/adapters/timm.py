"""timm ViTs: ``timm.layers.Attention`` (ViT, DeiT, DINOv2-style, with ``fused_attn`` on or off).

Keeps q/k norm, the optional output gate and ``scale_norm``; subclasses that override ``forward``
(RoPE, EVA, ...) are left alone rather than patched wrongly.
"""

from __future__ import annotations

import torch

from .core import AttentionKind, Site, install_forward, merge_heads

LOOKS_FOR = ["timm.layers.Attention"]


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
    from timm.layers import Attention

    def matches(m) -> bool:
        return isinstance(m, Attention) and type(m).forward is Attention.forward

    return [AttentionKind("timm.layers.Attention", matches, _install)]
