"""Watching one tower during forwards: residual-stream statistics per block and attention received per head.

The model is patched with an exact (optionally masked) variant through :func:`fnabench.patch`; every
attention site's variant is wrapped by an observer that first lets the variant attend, then recomputes
the softmax attention probabilities from the same q and k with the same masks (causal, padding, the
mask variant's key mask) and keeps, per head, the attention mass each token *receives* (the mean over
queries of its column). Block pre-hooks read the residual stream entering every block and a hook on
the last block reads the one leaving it; only per-token summaries are kept, never whole hidden states.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fnabench._errors import UserError
from fnabench.patching.core import patch
from fnabench.patching.sites import Site
from fnabench.variants import parse_variant
from fnabench.variants.mask import key_keep_mask
from fnabench.variants.variant import _applies

#: largest activations kept per residual state and image (value, token, feature dimension)
TOP_K = 16


class AnalysisInputError(UserError, ValueError):
    """Something analyze cannot do as asked (a variant that is not exact attention, a model with two towers)."""


@dataclass
class Captured:
    """Per-image arrays from one or more batches (numpy, float32 unless said).

    L blocks, so L + 1 residual states (index l: entering block l; index L: leaving the last one);
    N tokens; H heads; K = :data:`TOP_K`.
    """

    norms: list[np.ndarray] = field(default_factory=list)  # [L+1, N] L2 norm of each token's residual
    max_abs: list[np.ndarray] = field(default_factory=list)  # [L+1, N] largest |activation| of each token
    max_dim: list[np.ndarray] = field(default_factory=list)  # [L+1, N] int: the feature dimension holding it
    median_abs: list[np.ndarray] = field(default_factory=list)  # [L+1] median |activation| of the hidden state
    top: list[np.ndarray] = field(default_factory=list)  # [L+1, K, 3]: value, token, dimension
    received: list[np.ndarray] = field(default_factory=list)  # [L, H, N] attention mass each token receives
    masked: list[np.ndarray] = field(default_factory=list)  # [L, N] bool: removed by the mask variant
    features: list[np.ndarray] = field(default_factory=list)  # [D] the model's output, flattened

    def stacked(self) -> dict[str, np.ndarray]:
        """Every list stacked over images."""
        return {name: np.stack(values) for name, values in self.__dict__.items()}


class _Observer:
    """Stands in for a site's variant: attends through it, then records what each token received."""

    def __init__(self, inner, watch: _Watch) -> None:
        self._inner, self._watch = inner, watch

    def __getattr__(self, name: str) -> Any:  # adapters read e.g. ``site.variant.core``
        return getattr(self._inner, name)

    def attend(self, q, k, v, state, *, scale=None, attn_mask=None, causal: bool = False) -> torch.Tensor:
        out = self._inner.attend(q, k, v, state, scale=scale, attn_mask=attn_mask, causal=causal)
        inner = self._inner.for_causal() if causal else self._inner
        applied = _applies(inner.mask, state)
        masked = state.masked if applied else None
        key_masked = masked if applied and inner.mask["action"] == "keys" else None
        self._watch.attention(state.layer, q, k, scale, attn_mask, causal, key_masked, masked)
        return out


def attention_received(q: torch.Tensor, k: torch.Tensor, scale: float | None, attn_mask: torch.Tensor | None,
                       causal: bool, key_masked: torch.Tensor | None) -> torch.Tensor:
    """[B, H, N] attention mass each key token receives, averaged over queries, from [B, H, N, d] q and k.

    The probabilities are softmax(q·kᵀ·scale + masks) in float32 with the masks exact attention would use:
    ``attn_mask`` (bool keep-mask or additive), the causal triangle, and key masking (a masked token
    serves only itself).
    """
    q, k = q.float(), k.float()
    n = q.shape[-2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = q @ k.transpose(-1, -2) * scale
    keep = None
    if causal:
        keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[None, None]
    if key_masked is not None:
        keep = key_keep_mask(key_masked) if keep is None else keep & key_keep_mask(key_masked)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        else:
            logits = logits + attn_mask.float()
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits.softmax(dim=-1).mean(dim=-2)


class _Watch:
    """Hooks and observers on one tower; collects :class:`Captured` rows batch by batch."""

    def __init__(self, sites: list[Site]) -> None:
        self.sites = sorted(sites, key=lambda s: s.layer)
        self.depth = self.sites[0].state.num_layers
        self.batch = 0
        self._undo: list = []
        self._rows: dict[str, list] = {}

    def install(self) -> None:
        for site in self.sites:
            site.variant = _Observer(site.variant, self)
            hook = site.block.register_forward_pre_hook(self._pre_hook(site), with_kwargs=True)
            self._undo.append(hook.remove)
        last = self.sites[-1]
        self._undo.append(last.block.register_forward_hook(self._post_hook(last)).remove)

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        for site in self.sites:
            if isinstance(site.variant, _Observer):
                site.variant = site.variant._inner

    def begin(self, batch: int) -> None:
        self.batch = batch
        self._rows = {"residual": [None] * (self.depth + 1), "received": [None] * self.depth,
                      "masked": [None] * self.depth}

    def _layout(self, x: torch.Tensor, site: Site) -> torch.Tensor:
        """[B, N, C] from a block's input, which is [N, B, C] in sequence-first torch MultiheadAttention blocks."""
        if x.shape[0] == self.batch and (x.shape[1] != self.batch or getattr(site.module, "batch_first", True)):
            return x
        return x.transpose(0, 1)

    def _pre_hook(self, site: Site):
        def hook(_module, args, kwargs):
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            if isinstance(x, torch.Tensor) and x.dim() == 3:
                self._rows["residual"][site.layer] = _residual_stats(self._layout(x, site))

        return hook

    def _post_hook(self, site: Site):
        def hook(_module, _args, output):
            out = output
            while isinstance(out, (tuple, list)):
                out = out[0]
            if not isinstance(out, torch.Tensor):
                out = getattr(output, "last_hidden_state", None)
            if isinstance(out, torch.Tensor) and out.dim() == 3:
                self._rows["residual"][self.depth] = _residual_stats(self._layout(out, site))

        return hook

    def attention(self, layer, q, k, scale, attn_mask, causal, key_masked, masked) -> None:
        with torch.no_grad():
            self._rows["received"][layer] = attention_received(q, k, scale, attn_mask, causal, key_masked).cpu()
        b, _, n, _ = q.shape
        self._rows["masked"][layer] = (masked.cpu().bool() if masked is not None
                                       else torch.zeros(b, n, dtype=torch.bool))

    def finish(self, captured: Captured, features: torch.Tensor) -> None:
        """Append this batch's rows (every block must have run) to ``captured``."""
        missing = [i for i, r in enumerate(self._rows["residual"]) if r is None]
        missing += [i for i, r in enumerate(self._rows["received"]) if r is None]
        if missing:
            raise RuntimeError(f"analysis: blocks {sorted(set(missing))} did not run in this forward")
        residual = self._rows["residual"]
        stats = {key: torch.stack([r[key] for r in residual], dim=1).numpy() for key in residual[0]}
        received = torch.stack(self._rows["received"], dim=1).numpy()
        masked = torch.stack(self._rows["masked"], dim=1).numpy()
        feats = features.detach().float().reshape(self.batch, -1).cpu().numpy()
        for i in range(self.batch):
            captured.norms.append(stats["norms"][i])
            captured.max_abs.append(stats["max_abs"][i])
            captured.max_dim.append(stats["max_dim"][i])
            captured.median_abs.append(stats["median_abs"][i])
            captured.top.append(stats["top"][i])
            captured.received.append(received[i])
            captured.masked.append(masked[i])
            captured.features.append(feats[i])


@torch.no_grad()
def _residual_stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token summaries of a [B, N, C] residual stream: norms, largest |activation| and where, top-K."""
    x = x.detach().float()
    b, n, c = x.shape
    absx = x.abs()
    max_abs, max_dim = absx.max(dim=-1)
    flat = absx.reshape(b, n * c)
    k = min(TOP_K, n * c)
    values, where = flat.topk(k, dim=-1)
    top = torch.stack([values, (where // c).float(), (where % c).float()], dim=-1)
    if k < TOP_K:
        top = torch.cat([top, torch.full((b, TOP_K - k, 3), float("nan"))], dim=1)
    return {"norms": x.norm(dim=-1).cpu(), "max_abs": max_abs.cpu(), "max_dim": max_dim.cpu().int(),
            "median_abs": flat.median(dim=-1).values.cpu(), "top": top.cpu()}


@dataclass
class Watched:
    """A patched model under observation: ``run(batch, forward)`` → features, rows appended to ``captured``."""

    handle: Any
    watch: _Watch
    captured: Captured
    num_prefix: int
    causal: bool

    def run(self, batch: torch.Tensor | dict, forward) -> None:
        size = next(iter(batch.values())).shape[0] if isinstance(batch, dict) else batch.shape[0]
        self.watch.begin(size)
        with torch.no_grad():
            out = forward(batch)
        self.watch.finish(self.captured, _first_tensor(out))

    def close(self) -> None:
        self.watch.remove()
        self.handle.remove()


def _first_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, torch.Tensor):
        return out
    for name in ("last_hidden_state", "logits", "pooler_output"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise AnalysisInputError(f"analysis: the model returned {type(out).__name__}, not a tensor it can compare")


def watch(model: torch.nn.Module, variant: str = "exact") -> Watched:
    """Patch ``model`` with ``variant`` (exact attention, optionally masked) and start watching its tower."""
    parsed = parse_variant(variant)
    if not parsed.core.decl.exact:
        raise AnalysisInputError(f"analysis runs exact attention, optionally with a mask, so it can read the "
                                 f"attention probabilities; got {parsed.core.name!r} in {variant!r}; accepted: "
                                 "exact, mask:..., exact+mask:...")
    handle = patch(model, parsed)
    if len(handle.states) != 1:
        handle.remove()
        raise AnalysisInputError(f"analysis watches one tower, but {variant!r} patches "
                                 f"{', '.join(sorted(handle.states))}; accepted: a variant without tower=all")
    state = next(iter(handle.states.values()))
    w = _Watch(handle.sites)
    try:
        w.install()
    except Exception:
        w.remove()
        handle.remove()
        raise
    return Watched(handle, w, Captured(), state.num_prefix, state.causal)
