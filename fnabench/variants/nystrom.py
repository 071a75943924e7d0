"""Nyströmformer attention (Xiong et al., 2021): landmarks are segment means of Q and K.

The classic baseline FNA descends from. Segments are contiguous and as equal as possible, so
N need not be divisible by m (adaptive average pooling over the token axis).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fnabench.variants.causal import causal_segment_attention
from fnabench.variants.component import CORE, ComponentDecl
from fnabench.variants.fna import nystrom_core
from fnabench.variants.params import CACHE, FALLBACK, ITERS, LAYERS, RCOND, RIDGE, TOWER, M, choice

if TYPE_CHECKING:
    from fnabench.variants.spec import Component
    from fnabench.variants.variant import ForwardState


def segment_means(x: torch.Tensor, m: int) -> torch.Tensor:
    """[B, H, N, d] → [B, H, m, d]: the mean of each of m contiguous token segments."""
    b, h, n, d = x.shape
    pooled = F.adaptive_avg_pool1d(x.reshape(b * h, n, d).transpose(1, 2), m)
    return pooled.transpose(1, 2).reshape(b, h, m, d)


def segment_mean_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    m: int,
    *,
    scale: float | None = None,
    pinv: str = "newton",
    pinv_iters: int = 6,
    rcond: float | None = None,
    ridge: float = 1.0,
) -> torch.Tensor:
    """Nyströmformer on [B, H, N, d] with m segment-mean landmarks (no conv skip: training-free)."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    return nystrom_core(q, k, v, segment_means(q, m), segment_means(k, m), scale=s, pinv=pinv,
                        pinv_iters=pinv_iters, rcond=rcond, ridge=ridge, v_land=segment_means(v, m))


# ---------------------------------------------------------------------------------------------
# the component


def attend(core: Component, q, k, v, state: ForwardState, *, scale, attn_mask, key_masked) -> torch.Tensor:
    """Nyströmformer with ``m`` segment means (``attn_mask`` is always None here; key masks are refused)."""
    return segment_mean_attention(q, k, v, core["m"], scale=scale, pinv=core["pinv"], pinv_iters=core["iters"],
                                  rcond=core["rcond"], ridge=core["ridge"])


def attend_causal(core: Component, q, k, v, state: ForwardState, *, scale, key_masked) -> torch.Tensor:
    """Causal segment-mean attention (variants/causal.py)."""
    return causal_segment_attention(q, k, v, core["m"], scale=scale, inverse=core["pinv"], ridge=core["ridge"],
                                    iters=core["iters"])


COMPONENT = ComponentDecl(
    "nystrom", CORE,
    {
        "m": M,
        "layers": LAYERS,
        "tower": TOWER,
        "pinv": choice("newton", "exact", "ridge"),  # Nyströmformer keeps its paper's iterative inverse
        "iters": ITERS,
        "rcond": RCOND,
        "ridge": RIDGE,
        "cache": CACHE,
        "fallback": FALLBACK,
    },
    "Nyströmformer: m segment means of Q and K as landmarks",
    always_shown=frozenset({"m"}),
    attend=attend, attend_causal=attend_causal,
    causal_defaults={"pinv": "ridge"},
    key_mask_refusal="nystrom landmarks are segment means, so key masking is undefined; accepted: "
                     "mask:action=values with nystrom, or action=keys with exact/fna",
)
