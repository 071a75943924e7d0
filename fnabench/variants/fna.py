"""Fast Nyström Attention (FNA): classical Nyström with m sampled real tokens as landmarks.

Per head, with landmark set S and s = 1/√d (the official code's four steps):

    A   = softmax(s·Q_S K_Sᵀ)          m×m, a true sub-block of the attention matrix
    B   = softmax(s·Q_S Kᵀ)·V          m×d, landmark queries attend to all keys
    Ṽ   = Z·B,  Z ≈ A⁺                 m×d, computed in at least float32
    out = softmax(s·Q K_Sᵀ)·Ṽ          N×d, all queries attend to the landmark keys

Cost O(N·m·d + m³) per head instead of O(N²·d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fnabench.variants.pinv import pseudo_inverse, ridge_values, work_dtype
from fnabench.variants.threads import single_thread


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` [B, m] of x [B, H, N, d] → [B, H, m, d], the same indices for every head.

    Indexes whole token rows (all heads at once), about 3x faster on CPU than a gather with a
    broadcast index; the result is a strided view, which the matmuls and SDPA take as it is.
    """
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return x.transpose(1, 2)[rows, idx].transpose(1, 2)


def _finite_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast to ``dtype`` clamping to its finite range, so fp16 never sees an inf."""
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(x.dtype).max:
        big = torch.finfo(dtype).max
        x = x.clamp(-big, big)
    return x.to(dtype)


def nystrom_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_land: torch.Tensor,
    k_land: torch.Tensor,
    *,
    scale: float,
    pinv: str = "newton",
    pinv_iters: int = 6,
    rcond: float | None = None,
    ridge: float = 1.0,
    v_land: torch.Tensor | None = None,
    mask_land_land: torch.Tensor | None = None,
    mask_land_all: torch.Tensor | None = None,
    mask_all_land: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(s·Q K̃ᵀ) · pinv(softmax(s·Q̃ K̃ᵀ)) · softmax(s·Q̃ Kᵀ) V for given landmark queries/keys.

    Shared by FNA (sampled tokens) and Nyströmformer (segment means). Masks are bool, True = keep,
    broadcastable to [B, H, m, m], [B, H, m, N] and [B, H, N, m]. ``pinv='ridge'`` solves for Ṽ
    (pinv.ridge_values) and needs the landmarks' own values ``v_land``.
    """
    if pinv == "ridge" and v_land is None:
        raise ValueError("pinv='ridge' needs the landmarks' values v_land")
    wd = work_dtype(q.dtype)
    b = F.scaled_dot_product_attention(q_land, k, v, attn_mask=mask_land_all, scale=scale)
    with single_thread():  # m×m work: small ops that a second thread only slows under load
        logits = (q_land.to(wd) @ k_land.to(wd).transpose(-1, -2)) * scale
        if mask_land_land is not None:
            logits = logits.masked_fill(~mask_land_land, float("-inf"))
        a = torch.softmax(logits, dim=-1)
        if pinv == "ridge":
            v_tilde = ridge_values(a, b, v_land, ridge)
        else:
            v_tilde = pseudo_inverse(a, pinv, pinv_iters, rcond) @ b.to(wd)
    return F.scaled_dot_product_attention(q, k_land, _finite_cast(v_tilde, v.dtype), attn_mask=mask_all_land,
                                          scale=scale)


def fna_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmark_idx: torch.Tensor,
    *,
    scale: float | None = None,
    pinv: str = "newton",
    pinv_iters: int = 6,
    rcond: float | None = None,
    ridge: float = 1.0,
    key_masked: torch.Tensor | None = None,
) -> torch.Tensor:
    """FNA with an optional key mask: ``key_masked`` [B, N] bool removes those tokens as keys
    (−inf logits) for every query except the token itself, consistently in all three blocks."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    idx = landmark_idx.to(device=q.device, dtype=torch.long)
    q_land, k_land = _gather_tokens(q, idx), _gather_tokens(k, idx)
    masks: dict[str, torch.Tensor] = {}
    if key_masked is not None:
        n = q.shape[-2]
        key_masked = key_masked.to(device=q.device, dtype=torch.bool)
        land_masked = key_masked.gather(1, idx)  # [B, m]
        tokens = torch.arange(n, device=q.device)
        same_ll = idx[:, :, None] == idx[:, None, :]  # [B, m, m]
        same_la = idx[:, :, None] == tokens[None, None, :]  # [B, m, N]
        keep_ll = ~land_masked[:, None, :] | same_ll
        keep_la = ~key_masked[:, None, :] | same_la
        keep_al = ~land_masked[:, None, :] | same_la.transpose(1, 2)  # [B, N, m]
        # a query whose landmark keys are all masked falls back to all of them (no NaN rows)
        keep_al = keep_al | ~keep_al.any(-1, keepdim=True)
        masks = {
            "mask_land_land": keep_ll[:, None],
            "mask_land_all": keep_la[:, None],
            "mask_all_land": keep_al[:, None],
        }
    return nystrom_core(q, k, v, q_land, k_land, scale=s, pinv=pinv, pinv_iters=pinv_iters, rcond=rcond,
                        ridge=ridge, v_land=_gather_tokens(v, idx), **masks)


def nystrom_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    landmark_idx: torch.Tensor,
    *,
    pinv: str = "newton",
    pinv_iters: int = 6,
    scale: float | None = None,
) -> torch.Tensor:
    """FNA on q, k, v [B, H, N, d] with landmark token indices ``landmark_idx`` int64 [B, m] → [B, H, N, d].

    ``pinv`` is 'newton' (truncated Newton–Schulz, ``pinv_iters`` steps, the official default) or
    'exact' (``torch.linalg.pinv`` at torch's default cut-off). A and its pseudo-inverse are
    computed in at least float32 for float64/float32/bfloat16/float16 inputs.
    """
    return fna_attention(q, k, v, landmark_idx, scale=scale, pinv=pinv, pinv_iters=pinv_iters)
