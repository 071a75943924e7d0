"""open_clip's own ``open_clip.transformer.Attention`` (4.x blocks; ``block_type='custom'`` in 3.x), in both towers.

open_clip ≤ 3.3's default blocks hold ``nn.MultiheadAttention``, handled by ``torch_mha``. This
patch keeps every feature of the class: q/k LayerNorm, scaled-cosine logits, head scaling, the
inner norm; only the token mixing goes through the variant. The text tower's additive causal mask (−∞ above
the diagonal) runs the variant causally; any other mask (padding, CoCa's CLS mask) goes to the variant as it
is: exact attention honours it, an approximation refuses it in one line naming the mask. A subclass with a
``forward`` of its own is refused by name, not patched as this class.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from fnabench._extras import require
from fnabench.patching.sites import (
    AttentionKind,
    BlockKind,
    BlockSite,
    HostAdapter,
    Site,
    additive_mask,
    install_forward,
    merge_heads,
    split_heads,
)
from fnabench.patching.torch_mha import attend_masked, overrides_forward, refuse_class

LOOKS_FOR = ["open_clip.transformer.Attention"]
BLOCKS = ["open_clip.transformer.ResidualAttentionBlock"]


def _project(attn: nn.Module, x: torch.Tensor):
    if getattr(attn, "in_proj_weight", None) is not None:
        return F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    biases = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None, None, None)
    weights = (attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight)
    return tuple(F.linear(x, w, b) for w, b in zip(weights, biases, strict=True))


def _install(site: Site):
    attn = site.module
    original = type(attn).forward.__get__(attn)
    signature = inspect.signature(original)

    def forward(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        x = bound["x"]
        k_x, v_x = bound.get("k_x"), bound.get("v_x")
        if (k_x is not None and k_x is not x) or (v_x is not None and v_x is not x):
            return original(*args, **kwargs)  # cross-attention: not ours to approximate
        b, n, _ = x.shape
        q, k, v = (split_heads(t, attn.num_heads) for t in _project(attn, x))
        mask = additive_mask(bound.get("attn_mask"), q.dtype, true_means_masked=True)
        if mask is not None and mask.dim() == 3:
            mask = mask.reshape(b, attn.num_heads, n, n)
        if getattr(attn, "logit_scale", None) is not None:
            logit_scale = torch.clamp(attn.logit_scale, max=attn.logit_scale_max).exp()
            q, k, scale = F.normalize(q, dim=-1) * logit_scale, F.normalize(k, dim=-1), 1.0
        else:
            q, k, scale = attn.ln_q(q), attn.ln_k(k), attn.scale
        out = attend_masked(site, q, k, v, scale=scale, attn_mask=mask, source="open_clip's attn_mask")
        if getattr(attn, "head_scale", None) is not None:
            out = out * attn.head_scale
        out = attn.ln_inner(merge_heads(out))
        return attn.out_drop(attn.out_proj(out))

    return install_forward(attn, forward)


def kinds() -> list[AttentionKind]:
    Attention = require("open_clip.transformer").Attention

    def matches(m) -> bool:
        if overrides_forward(m, Attention):
            refuse_class(m, "it subclasses open_clip.transformer.Attention with a forward of its own",
                         ", ".join(LOOKS_FOR))
        return isinstance(m, Attention)

    return [AttentionKind("open_clip.transformer.Attention", matches, _install)]


def _install_block(site: BlockSite):
    blk = site.block
    original = type(blk).forward.__get__(blk)
    attn = getattr(blk, "attn", None)
    seq_first = isinstance(attn, nn.MultiheadAttention) and not attn.batch_first

    def forward(q_x, k_x=None, v_x=None, attn_mask=None):
        if k_x is not None or v_x is not None:
            return original(q_x, k_x, v_x, attn_mask=attn_mask)  # cross-attention blocks keep their tokens
        site.enter(q_x.transpose(0, 1) if seq_first else q_x)
        x = q_x + blk.ls_1(blk.attention(q_x=blk.ln_1(q_x), attn_mask=attn_mask))
        x = site.between(x.transpose(0, 1)).transpose(0, 1) if seq_first else site.between(x)
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

    return install_forward(blk, forward)


def block_kinds() -> list[BlockKind]:
    Block = require("open_clip.transformer").ResidualAttentionBlock

    def matches(m) -> bool:
        return isinstance(m, Block) and type(m).forward is Block.forward

    return [BlockKind("open_clip.transformer.ResidualAttentionBlock", matches, _install_block)]


ADAPTER = HostAdapter("open_clip", tuple(LOOKS_FOR), kinds, blocks=tuple(BLOCKS), block_kinds=block_kinds)
