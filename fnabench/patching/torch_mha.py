"""``torch.nn.MultiheadAttention`` self-attention (open_clip ≤ 3.3 blocks, mmcv's wrapper).

The patched forward recomputes q, k, v from ``in_proj_weight``/``in_proj_bias`` and applies
``out_proj``; it returns ``(output, None)``: attention weights are not materialised. Calls that are
not self-attention (query, key, value different tensors) run the original forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fnabench.patching.sites import (
    AttentionKind,
    HostAdapter,
    Site,
    additive_mask,
    install_forward,
    merge_heads,
    split_heads,
)

LOOKS_FOR = ["torch.nn.MultiheadAttention"]


def _project(mha: nn.MultiheadAttention, x: torch.Tensor):
    if mha._qkv_same_embed_dim:
        return F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    return tuple(F.linear(x, w, b) for w, b in zip(weights, biases, strict=True))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same tensor, or identical views of one (mmcv's wrapper transposes query, key and value separately)."""
    if a is b:
        return True
    root_a, root_b = a._base if a._base is not None else a, b._base if b._base is not None else b
    return (root_a is root_b and a.shape == b.shape and a.stride() == b.stride()
            and a.storage_offset() == b.storage_offset())


def _install(site: Site):
    mha: nn.MultiheadAttention = site.module  # type: ignore[assignment]
    if mha.bias_k is not None or mha.add_zero_attn:
        raise NotImplementedError(
            f"{site.name}: nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported"
        )
    original = type(mha).forward.__get__(mha)

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not (_same(query, key) and _same(key, value)):
            return original(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                            attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                            is_causal=is_causal)
        x = query if mha.batch_first else query.transpose(0, 1)
        b, n, _ = x.shape
        q, k, v = (split_heads(t, mha.num_heads) for t in _project(mha, x))
        mask = additive_mask(attn_mask, q.dtype, true_means_masked=True)
        if mask is not None and mask.dim() == 3:  # (B·H, L, S)
            mask = mask.reshape(b, mha.num_heads, n, n)
        pad = additive_mask(key_padding_mask, q.dtype, true_means_masked=True)
        if pad is not None:
            pad = pad[:, None, None, :]
            mask = pad if mask is None else mask + pad
        out = site.attend(q, k, v, attn_mask=mask)
        out = F.linear(merge_heads(out), mha.out_proj.weight, mha.out_proj.bias)
        return (out if mha.batch_first else out.transpose(0, 1)), None

    return install_forward(mha, forward)


def kinds() -> list[AttentionKind]:
    return [AttentionKind("torch.nn.MultiheadAttention",
                          lambda m: isinstance(m, nn.MultiheadAttention), _install)]


ADAPTER = HostAdapter("torch", tuple(LOOKS_FOR), kinds)
