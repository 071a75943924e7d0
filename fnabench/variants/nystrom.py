"""Nyströmformer attention (Xiong et al., 2021): landmarks are segment means of Q and K.

The classic baseline FNA descends from. Segments are contiguous and as equal as possible, so
N need not be divisible by m (adaptive average pooling over the token axis).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fnabench.variants.fna import nystrom_core


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
