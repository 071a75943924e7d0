"""Null attention: out = V, attention that costs nothing. Not an approximation: it bounds what any faster
attention could save (Amdahl), measured on the same model and task."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fnabench.variants.component import CORE, ComponentDecl
from fnabench.variants.params import LAYERS, TOWER

if TYPE_CHECKING:
    import torch

    from fnabench.variants.spec import Component
    from fnabench.variants.variant import ForwardState


def attend(component: Component, q, k, v, state: ForwardState, *, scale, attn_mask, key_masked) -> torch.Tensor:
    """Every token's output is its own value (after any value mask)."""
    return v


def attend_causal(component: Component, q, k, v, state: ForwardState, *, scale, key_masked) -> torch.Tensor:
    """The same: a token's own value never depends on later tokens."""
    return v


COMPONENT = ComponentDecl(
    "null", CORE,
    {"layers": LAYERS, "tower": TOWER},
    "out = V: attention that costs nothing, to measure Amdahl bounds",
    attend=attend, attend_causal=attend_causal,
)
