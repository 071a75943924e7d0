"""A parsed variant and the per-forward state it needs: what adapters call in place of attention.

Adapters compute q, k, v from a module's own weights and call :meth:`Variant.attend` with the
tower's :class:`ForwardState`; the variant decides, by tower and layer, whether the core's own attention
runs there (its declaration's ``attend``/``attend_causal``, variants/component.py) or exact attention,
and whether masking applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fnabench.measure import count_flops_aside
from fnabench.variants import landmarks as lm  # noqa: F401  (variant.lm: the selectors, as callers reach them)
from fnabench.variants.components import EXACT
from fnabench.variants.mask import choose, detect_tokens, zero_values
from fnabench.variants.params import format_value
from fnabench.variants.spec import Component, SpecError, parse_component, parse_flow

#: profiler range around every variant call; fnabench/measure.py counts FLOPs inside it as attention
ATTENTION_RANGE = "fnabench::attention"
#: the reference core with its defaults: where a core does not run, this one does
EXACT_CORE = parse_component(EXACT, EXACT)


@dataclass
class ForwardState:
    """Shared state of one tower during one forward: set by the adapter, read by the variant.

    ``layer`` is the block now running, ``residual`` the residual stream entering it. Landmark
    indices and detected tokens are cached here and cleared when block 0 starts a new forward.
    """

    tower: str
    num_layers: int
    num_prefix: int = 0
    layer: int = 0
    residual: torch.Tensor | None = None
    landmarks: torch.Tensor | None = None
    masked: torch.Tensor | None = None
    history: dict = field(default_factory=dict)
    #: a decoder tower (its attention is causal): unnamed landmark/inverse defaults are causal-safe
    causal: bool = False
    #: the model's only tower: a component applies to it whatever its ``tower`` key says
    only_tower: bool = False
    #: per layer, what a landmark KV cache keeps from the prefill: (landmark keys, Ṽ, last landmark position)
    prefill: dict = field(default_factory=dict)
    #: with ``fallback=auto``: per layer, whether the approximation ran (else exact) the last time that
    #: layer decided (decoding steps on a KV cache attend exactly and decide nothing)
    approximated: dict = field(default_factory=dict)
    #: per layer, why the host's attention ran exact there although the variant applies (a sliding window that
    #: binds), as of the last forward that decided (a prefill; decoding steps decide nothing)
    exact_because: dict = field(default_factory=dict)
    #: a multimodal language model's sequence: bool [N], True at image tokens (set by the adapter per forward;
    #: what ``guarantee=text`` keeps)
    image_tokens: torch.Tensor | None = None
    #: a token-flow variant's per-forward state (variants/flow.py), set by the patch; None otherwise
    flow: Any = None

    def begin_layer(self, layer: int, residual: torch.Tensor | None) -> None:
        """Called as block ``layer`` starts; block 0 starts a new forward and clears the caches."""
        if layer == 0:
            self.landmarks = None
            self.masked = None
            self.history = {}
            self.prefill = {}
        self.layer = layer
        self.residual = residual


def _applies(component: Component | None, state: ForwardState) -> bool:
    if component is None:
        return False
    if component["tower"] not in ("all", state.tower) and not state.only_tower:
        return False
    return state.layer in component["layers"].resolve(state.num_layers)


@dataclass(frozen=True)
class Variant:
    """An attention variant: one core (exact, fna, nystrom, null) plus an optional mask, or a token-flow
    component (``tome``) that changes how many tokens flow through the blocks (with exact attention)."""

    core: Component
    mask: Component | None = None
    flow: Component | None = None

    def _parts(self) -> list[Component]:
        return [c for c in (self.core, self.mask, self.flow) if c is not None]

    @property
    def canonical(self) -> str:
        """The identity string: defaults filled, keys sorted, core first."""
        return "+".join(c.canonical for c in self._parts())

    @property
    def short(self) -> str:
        """Compact display form: only keys that differ from their defaults."""
        parts = [c.short for c in self._parts()]
        return "+".join(p for p in parts if p != "exact" or len(parts) == 1)

    @property
    def is_exact(self) -> bool:
        return self.core.decl.exact and self.mask is None and self.flow is None

    def acts_at(self, state: ForwardState) -> bool:
        """Whether anything but plain exact attention runs at ``state.layer`` of ``state.tower`` (a core that
        applies there and is not exact, a mask that applies there, or a token flow): where a host passes an
        attention feature only exact attention honours (soft-capping, sinks), this decides refuse or run exact."""
        if self.flow is not None or _applies(self.mask, state):
            return True
        return not self.core.decl.exact and _applies(self.core, state)

    def for_causal(self) -> Variant:
        """This variant as it runs on causal attention: its core's unnamed keys take their causal-safe defaults
        (``ComponentDecl.causal_defaults``; fna: ``landmarks=stride``, fna and nystrom: ``pinv=ridge``,
        variants/causal.py); named values are kept, leaky or not."""
        core = self.core
        change = {k: v for k, v in core.decl.causal_defaults.items() if k not in core.given}
        return Variant(core.with_values(**change), self.mask, self.flow) if change else self

    def label(self, causal: bool = False) -> str:
        """The table's name: :attr:`short`; on causal attention a whole-sequence selector is named and
        flagged, since it lets later tokens choose earlier landmarks."""
        if not (causal and self.leaks_future):
            return self.short
        core = self.core
        named = f"{core.decl.leaky_key}={format_value(core[core.decl.leaky_key])}"
        short = self.short if named in self.short else self.short.replace(f"{core.name}:", f"{core.name}:{named},", 1)
        return short + " (sees the future)"

    @property
    def leaks_future(self) -> bool:
        """On causal attention, whether later tokens can change earlier outputs (a whole-sequence selector)."""
        return self.core.decl.leaks_future(self.core)

    def towers(self) -> set[str]:
        """Towers the variant changes ('image', 'text'); exact touches the image tower by default."""
        # exact's tower counts only where the spec names it: "exact+mask:tower=text" is the text tower alone
        names = {c["tower"] for c in self._parts() if "tower" in c.values and (not c.decl.exact or "tower" in c.given)}
        names = names or {"image"}
        return {"image", "text"} if "all" in names else names

    def check_depth(self, depths: dict[str, int]) -> None:
        """Refuse a component whose ``layers`` select no block of the towers it targets.

        ``depths`` maps each patched tower to its number of blocks. Without this check,
        ``fna:layers=50`` on a 6-block model would run exact attention and report a perfect score.
        """
        for component in self._parts():
            if "layers" not in component.values:
                continue
            towers = {t: n for t, n in depths.items() if component["tower"] in ("all", t)}
            if towers and not any(component["layers"].resolve(n) for n in towers.values()):
                sizes = ", ".join(f"{t} tower: {n} blocks" for t, n in towers.items())
                deepest = max(towers.values())
                raise SpecError(f"{component.short!r}: layers={component['layers']} selects no block ({sizes}); "
                                f"accepted: indices 0..{deepest - 1} or -{deepest}..-1, or a slice such as "
                                f"layers=-{max(deepest // 2, 1)}:")

    def __str__(self) -> str:
        return self.canonical

    # -----------------------------------------------------------------------------------------

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        state: ForwardState,
        *,
        scale: float | None = None,
        attn_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """Self-attention of [B, H, N, d] q, k, v at ``state.layer`` of ``state.tower`` → [B, H, N, d].

        ``causal`` asks for causal attention (token t sees tokens ≤ t), honoured by every variant.
        ``attn_mask`` is additive or bool (True = keep), broadcastable to [B, H, N, N]; only exact
        attention honours any other mask, approximations refuse it rather than silently ignore it.
        """
        with torch.profiler.record_function(ATTENTION_RANGE):
            if causal:
                if attn_mask is not None:
                    raise ValueError("causal=True takes no attn_mask; pass one or the other")
                return self._attend_causal(q, k, v, state, scale)
            return self._attend(q, k, v, state, scale, attn_mask)

    def _attend_causal(self, q, k, v, state: ForwardState, scale) -> torch.Tensor:
        """Causal attention (variants/causal.py for the approximations); future tokens never matter."""
        variant = self.for_causal()
        if state.flow is not None:  # token flow in a decoder (FastV-style): it reads q and k; no mask to change
            state.flow.attention(q, k, None)
        key_masked = None
        if _applies(variant.mask, state):
            key_masked, v = variant._apply_mask(v, state, causal=True)
        core = variant.core
        if not core.decl.exact and not variant._runs(q, k, v, state, causal=True):
            core = EXACT_CORE  # not here, m >= N (exact anyway), or fallback=auto: exact costs fewer counted FLOPs
        return core.decl.attend_causal(core, q, k, v, state, scale=scale, key_masked=key_masked)

    def _attend(self, q, k, v, state: ForwardState, scale, attn_mask) -> torch.Tensor:
        if state.flow is not None:  # token flow: keys for its matching, and proportional attention
            attn_mask = state.flow.attention(q, k, attn_mask)
        key_masked = None
        if _applies(self.mask, state):
            key_masked, v = self._apply_mask(v, state)
        core = self.core
        if core.decl.exact or not _applies(core, state):
            return self._exact(q, k, v, state, scale, attn_mask, key_masked)
        if attn_mask is not None:
            raise ValueError(
                f"{core.name} cannot honour an attention mask (causal or padded input) in the "
                f"{state.tower} tower; patch only unmasked towers (tower=image)"
            )
        if not self._runs(q, k, v, state):
            return self._exact(q, k, v, state, scale, None, key_masked)
        return core.decl.attend(core, q, k, v, state, scale=scale, attn_mask=None, key_masked=key_masked)

    def _runs(self, q, k, v, state: ForwardState, causal: bool = False) -> bool:
        """Whether the (non-exact) core's own attention runs here rather than exact attention: it applies to
        this tower and layer and, where it has ``m``, m < N and ``fallback=auto`` finds that it pays."""
        core = self.core
        if not _applies(core, state):
            return False
        if not core.decl.has_m:
            return True
        return core["m"] < q.shape[-2] and self._pays(q, k, v, state, causal=causal)

    def _pays(self, q, k, v, state: ForwardState, causal: bool = False) -> bool:
        """Whether the core runs here: always, unless ``fallback=auto`` and, at this input size, it would
        cost no fewer counted attention FLOPs than exact (counted once per shape on meta tensors)."""
        if self.core.values.get("fallback") != "auto":
            return True
        key = (self.core.canonical, tuple(q.shape), tuple(k.shape), q.dtype, causal, state.num_prefix,
               None if state.residual is None else tuple(state.residual.shape))
        if key not in _fallback_decision:
            _fallback_decision[key] = _counted_cost(self.core.with_values(fallback="none"), q, k, v, state, causal) < \
                _counted_cost(EXACT_CORE, q, k, v, state, causal)
        state.approximated[state.layer] = _fallback_decision[key]
        return _fallback_decision[key]

    def _exact(self, q, k, v, state: ForwardState, scale, attn_mask, key_masked) -> torch.Tensor:
        """Exact attention: the core's own where it is exact (``impl``), else the reference core's."""
        core = self.core if self.core.decl.exact else EXACT_CORE
        return core.decl.attend(core, q, k, v, state, scale=scale, attn_mask=attn_mask, key_masked=key_masked)

    def _apply_mask(self, v: torch.Tensor, state: ForwardState, causal: bool = False):
        mask = self.mask
        assert mask is not None
        if mask["tokens"] == "first":  # the usual attention sink, by position: no detection, causal-safe
            state.masked = torch.zeros(v.shape[0], v.shape[2], dtype=torch.bool, device=v.device)
            state.masked[:, 0] = True
        elif state.masked is None or mask["detect"] == "each":
            if state.residual is None:
                raise ValueError("mask needs the residual stream, but the adapter gave none")
            massive, artifact = detect_tokens(state.residual, num_prefix=state.num_prefix,
                                              artifact_ratio=mask["artifact_ratio"],
                                              massive_ratio=mask["massive_ratio"], causal=causal)
            state.masked = choose(massive, artifact, mask["tokens"])
            state.history[state.layer] = (massive, artifact)
        masked = state.masked
        if mask["action"] == "values":
            return None, zero_values(v, masked)
        return masked, v


#: the process-wide ``fallback=auto`` decisions: whether the core pays, by (core, shapes, dtype, causal, ...)
_fallback_decision: dict[tuple, bool] = {}


def _counted_cost(core: Component, q, k, v, state: ForwardState, causal: bool) -> int:
    """Counted attention FLOPs of ``core`` on meta tensors shaped like q, k, v (measure.count_flops_aside);
    on the tensors themselves where a shape depends on data (the causal kernel's group widths)."""
    def count(like) -> int:
        probe = ForwardState(state.tower, state.num_layers, state.num_prefix, state.layer, like(state.residual),
                             causal=state.causal, only_tower=state.only_tower)
        return count_flops_aside(lambda: Variant(core).attend(like(q), like(k), like(v), probe,
                                                              causal=causal)).attention

    try:
        return count(lambda x: None if x is None else torch.empty(x.shape, dtype=x.dtype, device="meta"))
    except (RuntimeError, NotImplementedError):  # e.g. .item() on a meta tensor
        return count(lambda x: x)


def parse_variant(spec: str | Variant) -> Variant:
    """Parse a spec such as ``'fna:m=64,layers=-6:+mask:tokens=artifact'`` into a :class:`Variant`."""
    if isinstance(spec, Variant):
        return spec
    core, mask, flow = parse_flow(spec)
    return Variant(core, mask, flow)


__all__ = ["ForwardState", "SpecError", "Variant", "parse_variant"]
