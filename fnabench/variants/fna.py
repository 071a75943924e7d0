"""Fast Nyström Attention (FNA): classical Nyström with m sampled real tokens as landmarks.

Per head, with landmark set S and s = 1/√d (the official code's four steps):

    A   = softmax(s·Q_S K_Sᵀ)          m×m, a true sub-block of the attention matrix
    B   = softmax(s·Q_S Kᵀ)·V          m×d, landmark queries attend to all keys
    Ṽ   = Z·B,  Z ≈ A⁺                 m×d, computed in at least float32
    out = softmax(s·Q K_Sᵀ)·Ṽ          N×d, all queries attend to the landmark keys

Cost O(N·m·d + m³) per head instead of O(N²·d). :func:`fna_attention` is the pure function; the ``fna``
component (end of this module) chooses the landmarks from its keys and the tower's state and calls it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fnabench.variants import landmarks as lm
from fnabench.variants.causal import causal_fna_attention, causal_order, stride_positions
from fnabench.variants.component import CORE, ComponentDecl
from fnabench.variants.params import (
    CACHE,
    FALLBACK,
    ITERS,
    LAYERS,
    RATIO,
    RCOND,
    RIDGE,
    TOWER,
    M,
    Param,
    TokenSet,
    choice,
    parse_bool,
    parse_int,
    parse_tokens,
)
from fnabench.variants.pinv import pseudo_inverse, ridge_values, work_dtype
from fnabench.variants.threads import single_thread

if TYPE_CHECKING:
    from fnabench.variants.spec import Component
    from fnabench.variants.variant import ForwardState


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
    """FNA on q, k, v [B, H, N, d] with landmark token indices ``landmark_idx`` int64 [B, m] → [B, H, N, d].

    ``pinv`` is 'newton' (truncated Newton–Schulz, ``pinv_iters`` steps, the official default), 'exact'
    (``torch.linalg.pinv``, cut-off ``rcond``, torch's default where None) or 'ridge' (a solve for Ṽ with
    Tikhonov weight ``ridge``, pinv.ridge_values). A and its inverse are computed in at least float32 for
    float64/float32/bfloat16/float16 inputs. ``key_masked`` [B, N] bool removes those tokens as keys (−inf
    logits) for every query except the token itself, consistently in all three blocks.
    """
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


def nystrom_attention(*args, **kwargs) -> torch.Tensor:
    """Deprecated: the old name of :func:`fna_attention` (same arguments); warns, then calls it."""
    warnings.warn("fnabench.variants.fna.nystrom_attention is deprecated; call fna_attention (same arguments)",
                  DeprecationWarning, stacklevel=2)
    return fna_attention(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# the component: landmarks chosen from the spec's keys and the tower's state

#: landmark selectors that look at the whole sequence: on causal attention later tokens would pick
#: the landmarks earlier tokens use, so they run there only when the spec names them
LEAKY_SELECTORS = ("fps", "norm")


def landmark_features(core: Component, q, k, v, state: ForwardState) -> torch.Tensor:
    """[B, N, ·]: what the landmark selector compares (``features``: heads' mean q, k or v, or the residual)."""
    which = core["features"]
    if which == "input":
        if state.residual is None:
            raise ValueError("features=input needs the residual stream, but the adapter gave none")
        return state.residual
    return {"q": q, "k": k, "v": v}[which].mean(dim=1)


def select_landmarks(core: Component, q, k, v, state: ForwardState, key_masked,
                     keep: bool = True) -> torch.Tensor:
    """Landmark indices [B, m] by ``core["landmarks"]``; with ``keep`` the tower's chosen ones are reused
    (chosen once per forward, unless ``resample``)."""
    if keep and state.landmarks is not None and not core["resample"]:
        return state.landmarks
    b, _, n, _ = q.shape
    m = core["m"]
    # the spec's masks are shared by every row and stay on the host, so FPS decides its guaranteed
    # block there; masked keys differ per row and move the decision to the device
    guarantee = core["guarantee"].mask(n, state.num_prefix, state.image_tokens)
    exclude = core["exclude"].mask(n, state.num_prefix, state.image_tokens)
    if key_masked is not None:  # a key-masked token would only ever serve itself
        exclude = exclude.to(q.device)[None].expand(b, n) | key_masked
    with torch.no_grad():
        feats = landmark_features(core, q, k, v, state)
        method = core["landmarks"]
        if method == "stride":
            first_row = exclude if exclude.dim() == 1 else exclude[0]
            idx = stride_positions(n, m, guarantee=guarantee, exclude=first_row)[None].expand(b, -1)
            idx = idx.to(q.device)
        elif method == "fps":
            idx = lm.farthest_point_sampling(feats, m, guarantee=guarantee, exclude=exclude)
        elif method == "random":
            idx = lm.random_selection(b, n, m, seed=core["seed"], device=q.device,
                                      guarantee=guarantee, exclude=exclude)
        else:
            source = state.residual if state.residual is not None else feats
            norms = source.float().norm(dim=-1)
            idx = lm.norm_first_selection(feats, norms, m, ratio=core["norm_ratio"],
                                          num_prefix=state.num_prefix, guarantee=guarantee,
                                          exclude=exclude)
    state.landmarks = idx
    return idx


def causal_landmarks(core: Component, q, k, v, state: ForwardState, key_masked) -> torch.Tensor:
    """Sorted landmark indices [B, m] holding position 0; ``stride`` and ``random`` never read content."""
    if state.landmarks is not None and not core["resample"] and state.landmarks.shape[0] == q.shape[0]:
        return state.landmarks
    b, _, n, _ = q.shape
    guarantee = core["guarantee"].mask(n, state.num_prefix, state.image_tokens)
    exclude = core["exclude"].mask(n, state.num_prefix, state.image_tokens)
    if core["landmarks"] == "stride":
        idx = stride_positions(n, core["m"], guarantee=guarantee, exclude=exclude)[None].expand(b, -1)
    else:
        idx = causal_order(select_landmarks(core, q, k, v, state, key_masked, keep=False), n)
    idx = idx.to(q.device)
    state.landmarks = idx
    return idx


def attend(core: Component, q, k, v, state: ForwardState, *, scale, attn_mask, key_masked) -> torch.Tensor:
    """FNA with the tower's landmarks (``attn_mask`` is always None here)."""
    idx = select_landmarks(core, q, k, v, state, key_masked)
    return fna_attention(q, k, v, idx, scale=scale, pinv=core["pinv"], pinv_iters=core["iters"],
                         rcond=core["rcond"], ridge=core["ridge"], key_masked=key_masked)


def attend_causal(core: Component, q, k, v, state: ForwardState, *, scale, key_masked) -> torch.Tensor:
    """Causal FNA (variants/causal.py); keeps the prefill's landmark keys and Ṽ for a landmark KV cache."""
    idx = causal_landmarks(core, q, k, v, state, key_masked)
    out, (k_land, v_tilde) = causal_fna_attention(q, k, v, idx, scale=scale, inverse=core["pinv"],
                                                  ridge=core["ridge"], iters=core["iters"],
                                                  key_masked=key_masked, return_cache=True)
    state.prefill[state.layer] = (idx, k_land, v_tilde)
    return out


_TOKENS = "none | prefix | cls | text | a slice a:b"

COMPONENT = ComponentDecl(
    "fna", CORE,
    {
        "m": M,
        "layers": LAYERS,
        "tower": TOWER,
        "landmarks": choice("fps", "random", "norm", "stride"),
        "features": choice("q", "k", "v", "input"),
        # the ridge solve by default: fewer counted FLOPs than Newton–Schulz and, measured on the offline
        # DINOv2-S fidelity task (configs/sweeps/fna_inverses.toml), closer to exact attention
        "pinv": choice("ridge", "newton", "exact"),
        "iters": ITERS,
        "rcond": RCOND,
        "resample": Param(parse_bool, False, "true | false"),
        "guarantee": Param(parse_tokens, TokenSet("prefix"), _TOKENS),
        "exclude": Param(parse_tokens, TokenSet("none"), _TOKENS),
        "seed": Param(parse_int, 0, "an integer"),
        "norm_ratio": Param(float, 3.0, RATIO, lambda v: v > 1),
        "ridge": RIDGE,
        "cache": CACHE,
        "fallback": FALLBACK,
    },
    "Fast Nyström Attention: m real tokens as landmarks (fps, random, norm or stride)",
    always_shown=frozenset({"m"}),
    attend=attend, attend_causal=attend_causal,
    # on causal attention an unnamed selector becomes stride (content never decides) and the inverse ridge
    causal_defaults={"landmarks": "stride", "pinv": "ridge"},
    leaky_key="landmarks", leaky_values=LEAKY_SELECTORS,
)
