"""``torch.nn.MultiheadAttention`` self-attention (open_clip ≤ 3.3 blocks, mmcv's wrapper), and the mask rules
every adapter that hands a host's mask to a variant shares.

The patched forward recomputes q, k, v from ``in_proj_weight``/``in_proj_bias`` and applies
``out_proj``; it returns ``(output, None)``: attention weights are not materialised. Calls that are
not self-attention (query, key, value different tensors) run the original forward. A causal mask (−∞ above
the diagonal, nothing else: open_clip's text tower) runs the variant causally; any other mask or bias goes
to the variant as it is, which exact attention honours and an approximation refuses in one line that names
the mask (:func:`attend_masked`). Subclasses with their own ``forward`` (torch.ao's quantizable MHA) are
refused by name rather than patched as if they were the base class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fnabench._errors import UserError
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
#: the variant's own words when an approximation is handed a mask (variants/variant.py)
_MASK_REFUSAL = "cannot honour an attention mask"


class AttentionMaskRefused(UserError, ValueError):
    """An approximation was asked to run under a mask or additive bias it cannot honour (one line naming both)."""


class UnservableAttentionError(UserError, TypeError):
    """An attention class fnabench recognises but cannot patch faithfully; raised while matching, at patch time."""


def refuse_class(module: nn.Module, lacks: str, patches: str) -> None:
    """Raise the one-line refusal for ``module``'s class: what it is, what it lacks, what fnabench patches."""
    cls = type(module)
    raise UnservableAttentionError(f"cannot patch {cls.__module__}.{cls.__qualname__}: {lacks}; fnabench patches "
                                   f"{patches}")


def overrides_forward(module: nn.Module, base: type) -> bool:
    """A subclass of ``base`` whose ``forward`` is its own (so an install written for ``base`` would be wrong)."""
    return isinstance(module, base) and type(module).forward is not base.forward


def _drop(mask: torch.Tensor) -> torch.Tensor:
    """Where an additive mask removes a pair (−∞ or the dtype's lowest value)."""
    return mask <= torch.finfo(mask.dtype).min


def is_causal_mask(mask: torch.Tensor | None, n: int) -> bool:
    """Whether an additive mask broadcastable to [..., n, n] is exactly causal: −∞ above the diagonal, 0 elsewhere."""
    if mask is None or mask.dim() < 2 or tuple(mask.shape[-2:]) != (n, n) or not mask.is_floating_point():
        return False
    above = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
    flat = mask.reshape(-1, n, n)
    return bool(_drop(flat[:, above]).all()) and bool((flat[:, ~above] == 0).all())


def describe_mask(mask: torch.Tensor, n: int) -> str:
    """What an additive mask over [..., n, n] is, in a few words, for a refusal."""
    shape = "x".join(str(s) for s in mask.shape)
    dropped = _drop(mask)
    if not dropped.any():
        return f"an additive bias of shape {shape} (a finite value per token pair)"
    if tuple(mask.shape[-2:]) == (n, n):
        above = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
        if bool(dropped[..., above].all()):
            return f"a causal mask of shape {shape} that also drops earlier keys (padding)"
    share = dropped.float().mean().item()
    return f"a mask of shape {shape} that is not causal (it drops {share:.0%} of token pairs)"


def attend_masked(site: Site, q, k, v, *, source: str, scale=None, attn_mask=None) -> torch.Tensor:
    """``site.attend`` under the host's additive ``attn_mask``: a causal one runs causally, any other is the
    variant's to honour; an approximation's refusal comes back as one line naming the module, ``source`` (where
    the mask comes from) and what the mask is."""
    n = q.shape[-2]
    if k.shape[-2] == n and is_causal_mask(attn_mask, n):
        return site.attend(q, k, v, scale=scale, causal=True)
    try:
        return site.attend(q, k, v, scale=scale, attn_mask=attn_mask)
    except ValueError as err:
        if attn_mask is None or _MASK_REFUSAL not in str(err):
            raise
        where = site.name or type(site.module).__name__
        raise AttentionMaskRefused(f"{where} ({source}): {site.variant.core.name} {_MASK_REFUSAL}, here "
                                   f"{describe_mask(attn_mask, n)}; exact attention runs it (variant 'exact', "
                                   "or a mask-only one)") from None


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


def _mask(mha: nn.MultiheadAttention, attn_mask, key_padding_mask, b: int, n: int, dtype) -> torch.Tensor | None:
    """MHA's ``attn_mask`` (2-D or (B·H, L, S)) and ``key_padding_mask`` as one additive [B|1, H|1, n, n] mask."""
    mask = additive_mask(attn_mask, dtype, true_means_masked=True)
    if mask is not None and mask.dim() == 3:  # (B·H, L, S)
        mask = mask.reshape(b, mha.num_heads, n, n)
    pad = additive_mask(key_padding_mask, dtype, true_means_masked=True)
    if pad is not None:
        pad = pad[:, None, None, :]
        mask = pad if mask is None else mask + pad
    return mask


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
        if is_causal and key_padding_mask is None:  # torch's hint that attn_mask is the causal mask
            out = site.attend(q, k, v, causal=True)
        else:
            mask = _mask(mha, attn_mask, key_padding_mask, b, n, q.dtype)
            out = attend_masked(site, q, k, v, attn_mask=mask, source="nn.MultiheadAttention's attn_mask")
        out = F.linear(merge_heads(out), mha.out_proj.weight, mha.out_proj.bias)
        return (out if mha.batch_first else out.transpose(0, 1)), None

    return install_forward(mha, forward)


def kinds() -> list[AttentionKind]:
    MHA = nn.MultiheadAttention

    def matches(m) -> bool:
        if overrides_forward(m, MHA):
            refuse_class(m, "it subclasses torch.nn.MultiheadAttention with a forward of its own",
                         "nn.MultiheadAttention itself")
        return isinstance(m, MHA)

    return [AttentionKind("torch.nn.MultiheadAttention", matches, _install)]


ADAPTER = HostAdapter("torch", tuple(LOOKS_FOR), kinds)
