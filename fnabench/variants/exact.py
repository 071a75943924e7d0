"""Exact softmax attention: the reference every approximation is measured against, and the ``exact`` component."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fnabench.variants.component import CORE, ComponentDecl
from fnabench.variants.mask import key_keep_mask
from fnabench.variants.params import TOWER, Param, choice

if TYPE_CHECKING:
    from fnabench.variants.spec import Component
    from fnabench.variants.variant import ForwardState


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(s·QKᵀ + mask)·V written out, for [B, H, N, d] inputs; ``attn_mask`` is additive or bool (True = keep)."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q @ k.transpose(-1, -2)) * s
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    weights = torch.softmax(logits.float(), dim=-1).to(v.dtype)
    return weights @ v


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same through ``F.scaled_dot_product_attention`` (fused kernels where the device has them)."""
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


# ---------------------------------------------------------------------------------------------
# the component


def attend(component: Component, q, k, v, state: ForwardState, *, scale, attn_mask, key_masked) -> torch.Tensor:
    """Exact attention honouring ``attn_mask`` and, where a mask removes keys, ``key_masked`` [B, N]."""
    if key_masked is not None:
        keep = key_keep_mask(key_masked)
        if attn_mask is None:
            attn_mask = keep
        elif attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & keep
        else:
            attn_mask = attn_mask + torch.zeros_like(keep, dtype=q.dtype).masked_fill(~keep, float("-inf"))
    if component["impl"] == "math":
        return exact_attention(q, k, v, scale=scale, attn_mask=attn_mask)
    return sdpa_attention(q, k, v, scale=scale, attn_mask=attn_mask)


def attend_causal(component: Component, q, k, v, state: ForwardState, *, scale, key_masked) -> torch.Tensor:
    """Exact causal attention (SDPA's causal kernel where no key is masked)."""
    n = q.shape[-2]
    keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[None, None]
    if key_masked is not None:
        keep = keep & key_keep_mask(key_masked)
    if component["impl"] == "math":
        return exact_attention(q, k, v, scale=scale, attn_mask=keep)
    if key_masked is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return sdpa_attention(q, k, v, scale=scale, attn_mask=keep)


COMPONENT = ComponentDecl(
    "exact", CORE,
    {
        "impl": choice("sdpa", "math"),
        # where exact attention is patched in (a LLaVA model's language model is tower=text); not in the
        # canonical string at its default, so exact's identity is what it always was
        "tower": Param(TOWER.parse, "image", TOWER.accepts, omit_at_default=True),
    },
    "exact softmax attention (impl=sdpa: fused kernels, math: written out), the reference",
    attend=attend, attend_causal=attend_causal, exact=True,
)
