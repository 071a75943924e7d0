"""The ``"fnabench"`` function transformers' attention modules dispatch to, and what it does with every argument.

A module that dispatches through ``AttentionInterface`` hands over q, k, v ([B, H, N, d], rotary positions
already applied), its mask and keyword arguments. Each argument is honoured or refused by name:

- ``scaling``; ``is_causal`` (else the module's own ``is_causal``) picks causal or bidirectional attention;
  ``dropout`` only as 0 (a module in training mode is refused);
- ``sliding_window``: a layer whose window binds (its mask, as the host built it, hides a key the plain
  causal or full pattern would show) runs exact attention with that mask, and the tower's state records
  why (``ForwardState.exact_because``); where it does not bind the layer is global and the variant runs.
  Landmarks that ignore the window would let a token see keys its window hides: on random Gemma-3-style
  decoders, FNA in every layer with the window ignored puts the logits 0.86–1.01 (relative) from exact,
  FNA in the global layer only 0.07–0.28 (benchmarks/sliding_window.py);
- ``softcap`` (Gemma-2's logit soft-capping), ``s_aux`` (attention sinks, gpt-oss) and ``position_bias``
  (an additive bias): exact attention computes them (an eager softmax here); an approximation refuses them;
- a mask: none or exactly lower-triangular is plain causal (the variant runs causally); anything else runs
  exact attention, or is refused by an approximation with a line that says what the mask is (padding, a
  window, a graded float bias, a custom pattern);
- bookkeeping arguments (positions, cache bookkeeping, ``output_attentions``) change nothing computed here;
  any other argument with a value is refused by name, never dropped.

Grouped- and multi-query heads are repeated to the query heads; q/k and v head sizes may differ.
Decoding steps (fewer queries than cached keys) attend exactly to what the cache holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fnabench._errors import UserError
from fnabench.patching.kv_cache import compress_layer
from fnabench.patching.sites import Site
from fnabench.variants.variant import ATTENTION_RANGE

IMPLEMENTATION = "fnabench"
#: arguments that change nothing this function computes (positions are in q/k already; the rest is bookkeeping)
INERT = frozenset({"output_attentions", "position_ids", "cache_position", "use_cache", "position_embeddings",
                   "past_key_values", "past_key_value", "layer_idx", "return_dict", "token_type_ids", "head_mask",
                   "layer_head_mask", "output_hidden_states", "kwargs"})
#: arguments this function reads
READ = ("scaling", "dropout", "is_causal", "sliding_window", "softcap", "s_aux", "position_bias")


class UnsupportedAttentionError(UserError, ValueError):
    """A host attention argument or mask that the variant cannot honour."""


class PaddingMaskError(UnsupportedAttentionError):
    """An approximation asked to honour a padding mask it cannot honour."""


@dataclass(frozen=True)
class Call:
    """One call's arguments, as read (everything else was inert or refused)."""

    scaling: float | None
    causal: bool
    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def exact_only(self) -> list[str]:
        """The features in this call that only exact attention computes here, by name."""
        names = [f"attention logit soft-capping (softcap={self.softcap:g})"] if self.softcap else []
        names += ["attention sinks (s_aux)"] if self.sinks is not None else []
        return names + (["an additive position bias (position_bias)"] if self.bias is not None else [])



def read_call(module: nn.Module, scaling, dropout, kwargs: dict) -> Call:
    """The arguments of one interface call, or a one-line refusal naming an argument fnabench would drop."""
    name = type(module).__name__
    unknown = sorted(k for k, v in kwargs.items() if k not in INERT and k not in READ
                     and v is not None and v is not False)
    if unknown:
        raise UnsupportedAttentionError(
            f"{name} passes attention argument(s) {', '.join(unknown)} that fnabench does not know, and would "
            f"drop; accepted: {', '.join(READ)} and bookkeeping ({', '.join(sorted(INERT))})")
    if dropout:
        raise UnsupportedAttentionError(f"{name} asks for attention dropout {dropout:g} (the module is in training "
                                        "mode); accepted: model.eval(), where dropout is 0")
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False)) if causal is None else bool(causal)
    window = kwargs.get("sliding_window")
    if isinstance(window, (tuple, list)):  # (left, right) windows: the wider side decides whether it binds
        window = max(int(w) for w in window if w is not None) if any(w is not None for w in window) else None
    return Call(scaling=scaling, causal=causal, window=None if window is None else int(window),
                softcap=kwargs.get("softcap") or None, sinks=kwargs.get("s_aux"), bias=kwargs.get("position_bias"))


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, H_kv, N, d] → [B, heads, N, d]: grouped-query attention's key/value heads, one per query head."""
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def is_plain_causal(mask: torch.Tensor | None, n: int) -> bool:
    """True for no mask or a boolean [.., n, n] mask that is exactly lower-triangular in every row."""
    if mask is None:
        return True
    if mask.dtype != torch.bool or mask.shape[-1] != n or mask.shape[-2] != n:
        return False
    return bool((mask == torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()).all())


def _hides_keys(mask: torch.Tensor | None) -> bool:
    """Whether a bidirectional mask hides any key from any query (bool False, or a float at the dtype's floor)."""
    if mask is None:
        return False
    if mask.dtype == torch.bool:
        return not bool(mask.all())
    return bool((mask <= torch.finfo(mask.dtype).min / 2).any())


def describe_mask(mask: torch.Tensor, causal: bool) -> str:
    """What a mask that is not plain causal is, in words, for the refusal line."""
    if mask.dtype != torch.bool:
        low = torch.finfo(mask.dtype).min / 2 if mask.dtype.is_floating_point else -1
        values = mask[mask > low]
        if values.numel() and (values != 0).any():
            return "a graded float mask (an additive position bias such as ALiBi)"
        mask = mask > low
    q_len, kv_len = mask.shape[-2:]
    tril = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
    if causal and (mask & ~tril).any():
        return "a mask that lets tokens see later ones"
    full = tril if causal else torch.ones_like(tril)
    valid = mask.any(-2, keepdim=True)  # keys some query sees
    if torch.equal(mask, full & valid):
        return ("the padding mask of a left-padded batch" if causal else "a padding mask")
    rows = torch.arange(q_len, device=mask.device)[:, None] + (kv_len - q_len)
    cols = torch.arange(kv_len, device=mask.device)[None]
    for w in range(1, kv_len + 1):
        band = full & ((rows - cols).abs() < w)
        if torch.equal(mask, band & valid):
            return f"a sliding-window mask (window {w})"
    return "a custom attention mask (neither plain causal, padding nor a window)"


def exact_attention(query, key, value, mask, call: Call) -> torch.Tensor:
    """Exact attention with every feature the call carries: causal, mask, bias, soft-capping, sinks."""
    heads = query.shape[1]
    key, value = repeat_kv(key, heads), repeat_kv(value, heads)
    q_len, kv_len = query.shape[2], key.shape[2]
    if call.causal and mask is None and q_len > 1:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    if call.bias is not None:
        bias = call.bias[..., :kv_len].to(query.dtype)
        mask = bias if mask is None else (bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                                          else bias + mask)
    with torch.profiler.record_function(ATTENTION_RANGE):
        if call.softcap is None and call.sinks is None:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=call.scaling)
        scale = call.scaling if call.scaling is not None else query.shape[-1] ** -0.5
        logits = (query @ key.transpose(-1, -2)) * scale
        if call.softcap is not None:
            logits = torch.tanh(logits / call.softcap) * call.softcap
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        if call.sinks is None:
            return torch.softmax(logits, -1) @ value
        sink = call.sinks.to(logits.dtype).reshape(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
        weights = torch.softmax(torch.cat([logits, sink], -1), -1)[..., :-1]
        return weights @ value


def _instead_of_variant(site: Site, query, key, value, mask, call: Call, window_binds: bool) -> torch.Tensor | None:
    """What runs at this prefill instead of the variant, or None where the variant runs: exact attention where the
    sliding window binds (the state says why) or where the call has a feature only exact computes and the variant
    does nothing at this layer; a one-line refusal where the variant would act on such a feature."""
    state = site.state
    state.exact_because.pop(site.layer, None)
    if call.window is not None and window_binds:
        state.exact_because[site.layer] = f"sliding window {call.window} over {key.shape[2]} tokens"
        return exact_attention(query, key, value, mask, call)
    extras = call.exact_only()
    if not extras:
        return None
    state.layer = site.layer
    if site.variant.acts_at(state):
        raise UnsupportedAttentionError(
            f"{site.variant.short} cannot honour {' and '.join(extras)} in {site.name} "
            f"({type(site.module).__name__}); accepted: exact attention there (layers= that leave it out)")
    return exact_attention(query, key, value, mask, call)


def _masked(site: Site, query, key, value, mask, call: Call) -> torch.Tensor:
    """A mask that is not plain causal: the variant (exact honours it), or a refusal saying what the mask is."""
    try:
        return site.attend(query, key, value, scale=call.scaling, attn_mask=mask)
    except ValueError as err:
        what = describe_mask(mask, call.causal)
        error = PaddingMaskError if "padding" in what else UnsupportedAttentionError
        accepted = ("unpadded input (one sequence, or sequences of equal length) or exact attention"
                    if "padding" in what else "plain causal or unmasked input, or exact attention")
        raise error(f"{site.variant.core.name} cannot honour {what} in {site.name}; accepted: {accepted}") from err


def _causal(site: Site, module: nn.Module, query, key, value, mask, call: Call) -> torch.Tensor:
    """Prefill: the variant, causally (exact in a layer whose window binds); decoding: exact over the cache."""
    q_len, kv_len = query.shape[2], key.shape[2]
    state = site.state
    if q_len < kv_len:  # decoding (or chunked prefill) on a cache: exact over what it holds
        return exact_attention(query, key, value, mask, call)
    out = _instead_of_variant(site, query, key, value, mask, call, not is_plain_causal(mask, q_len))
    if out is not None:
        return out
    heads = query.shape[1]
    key, value = repeat_kv(key, heads), repeat_kv(value, heads)
    if not is_plain_causal(mask, q_len):
        return _masked(site, query, key, value, mask, call)
    state.prefill.pop(site.layer, None)
    out = site.attend(query, key, value, scale=call.scaling, causal=True)
    cache = module.__dict__.get("_fnabench_cache")
    entry = state.prefill.get(site.layer)
    if cache is not None and site.variant.core.values.get("cache") == "landmark":
        _check_cache(site, cache.layers[module.layer_idx], key, value)  # at m >= N too: refused either way
        if entry is not None:
            compress_layer(cache, module.layer_idx, *entry)
    return out


def _check_cache(site: Site, layer, key: torch.Tensor, value: torch.Tensor) -> None:
    """Refuse ``cache=landmark`` where the cache does not hold this attention's keys and values (multi-head
    latent attention caches a compressed latent): the landmark form replaces keys and values."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if keys is None or values is None or keys.shape[-1] != key.shape[-1] or values.shape[-1] != value.shape[-1]:
        held = "nothing" if keys is None else f"keys {keys.shape[-1]}-wide and values {values.shape[-1]}-wide"
        raise UnsupportedAttentionError(
            f"cache=landmark replaces the cached keys and values of {site.name} by landmarks, and "
            f"{type(site.module).__name__}'s cache holds {held} against attention heads of {key.shape[-1]} and "
            f"{value.shape[-1]} (a compressed latent); accepted: cache=full")


def _bidirectional(site: Site, query, key, value, mask, call: Call) -> torch.Tensor:
    """An encoder's self-attention: the variant (exact in a layer whose window binds); keys that are not the
    queries' own tokens (cross-attention reached through a self-attention class) run exact."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if q_len != kv_len:
        return exact_attention(query, key, value, mask, call)
    out = _instead_of_variant(site, query, key, value, mask, call, _hides_keys(mask))
    if out is not None:
        return out
    heads = query.shape[1]
    key, value = repeat_kv(key, heads), repeat_kv(value, heads)
    if mask is None:
        return site.attend(query, key, value, scale=call.scaling)
    return _masked(site, query, key, value, mask, call)


def fnabench_attention(module: nn.Module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The ``AttentionInterface`` function: [B, H, N, d] in, ([B, N, H, d], None) out, like sdpa's."""
    call = read_call(module, scaling, dropout, kwargs)
    site = module.__dict__.get("_fnabench_site")
    if site is None:  # a module sharing the config that fnabench did not patch: exact, with all its features
        out = exact_attention(query, key, value, attention_mask, call)
    elif call.causal:
        out = _causal(site, module, query, key, value, attention_mask, call)
    else:
        out = _bidirectional(site, query, key, value, attention_mask, call)
    return out.transpose(1, 2).contiguous(), None
