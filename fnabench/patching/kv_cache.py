"""The landmark KV cache: after a causal-FNA prefill, keep the m landmark keys with their Nyström
values Ṽ and the real tokens after the last landmark, instead of every prefill token.

A decoding step then attends exactly to what the layer holds, which is the same rule the prefill
used for its own queries (variants/causal.py): landmarks before the query, with Ṽ, and the real
tokens since the last landmark. The layer keeps counting the tokens it dropped, so positions
(rotary, learned) and ``get_seq_length`` go on as if the whole prefill were still there.
"""

from __future__ import annotations

import torch


def _landmark_layer_class(base: type) -> type:
    """A subclass of the cache's own layer class that reports dropped tokens in its length."""

    class LandmarkLayer(base):  # type: ignore[misc, valid-type]
        dropped = 0

        def get_seq_length(self) -> int:
            return super().get_seq_length() + self.dropped

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return super().get_seq_length() + query_length, 0

    LandmarkLayer.__name__ = f"Landmark{base.__name__}"
    return LandmarkLayer


_CLASSES: dict[type, type] = {}


def compress_layer(cache, layer_idx: int, idx: torch.Tensor, _k_land: torch.Tensor, v_tilde: torch.Tensor) -> None:
    """Replace layer ``layer_idx`` of ``cache`` (just filled by a prefill) by its landmark form.

    ``idx`` [B, m] are the sorted landmark positions, ``v_tilde`` [B, H, m, d] their values per query
    head; with grouped-query attention Ṽ is averaged over the query heads that share a key/value head
    (exact when every token is a landmark, since then every head's Ṽ is V).
    """
    layer = cache.layers[layer_idx]
    keys, values = layer.keys, layer.values  # [B, H_kv, N, d]
    b, h_kv, n, d = keys.shape
    idx = idx.to(keys.device)
    k_land = keys.gather(2, idx[:, None, :, None].expand(b, h_kv, idx.shape[1], d))
    heads = v_tilde.shape[1]
    v_land = v_tilde.reshape(b, h_kv, heads // h_kv, idx.shape[1], d).mean(2).to(values.dtype)
    tail = int(idx[:, -1].min()) + 1  # rows share the tail after the earliest last landmark
    layer.keys = torch.cat([k_land, keys[:, :, tail:]], 2)
    layer.values = torch.cat([v_land, values[:, :, tail:]], 2)
    base = type(layer)
    if base not in _CLASSES.values():
        _CLASSES.setdefault(base, _landmark_layer_class(base))
        layer.__class__ = _CLASSES[base]
    layer.dropped = getattr(layer, "dropped", 0) + n - layer.keys.shape[2]


def cache_bytes(cache) -> int:
    """Bytes held by a transformers cache's key and value tensors."""
    layers = getattr(cache, "self_attention_cache", cache).layers
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))
