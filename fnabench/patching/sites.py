"""What a host adapter declares and the helpers its patched forwards use: an attention :class:`Site` and its
:class:`AttentionKind`, a block :class:`BlockSite` and its :class:`BlockKind` (token flows), the one
:class:`HostAdapter` each module under ``fnabench/patching/`` exports, and forward/mask/head helpers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fnabench.variants import ForwardState, Variant
from fnabench.variants.variant import ATTENTION_RANGE


@dataclass
class Site:
    """One attention module to patch: where it is, which tower and layer, and how to call the variant."""

    name: str
    module: nn.Module
    kind: AttentionKind
    block: nn.Module
    layer: int
    state: ForwardState
    variant: Variant
    #: the block is an indexed member of a block list (not e.g. a pooling head's attention)
    listed: bool = True

    def attend(self, q, k, v, *, scale=None, attn_mask=None, causal: bool = False) -> torch.Tensor:
        """Run the variant for this site's layer on [B, H, N, d] q, k, v (causally if ``causal``)."""
        self.state.layer = self.layer
        return self.variant.attend(q, k, v, self.state, scale=scale, attn_mask=attn_mask, causal=causal)


@dataclass
class AttentionKind:
    """How one host attention class is recognised and patched.

    ``install(site)`` patches ``site.module`` and returns a function that undoes exactly that.
    """

    label: str
    matches: Callable[[nn.Module], bool]
    install: Callable[[Site], Callable[[], None]]


@dataclass
class BlockSite:
    """One block of a tower under a token-flow variant: what its patched forward calls around attention."""

    block: nn.Module
    layer: int
    state: ForwardState

    def enter(self, x: torch.Tensor) -> None:
        """Call first, with the block's input [B, N, C]."""
        self.state.flow.enter(self.layer, x)

    def between(self, x: torch.Tensor) -> torch.Tensor:
        """Call on the residual stream after the attention branch, before the MLP branch."""
        with torch.profiler.record_function(ATTENTION_RANGE):  # the flow's matching is its token-mixing cost
            return self.state.flow.between(self.layer, x)


@dataclass
class BlockKind:
    """How one host block class runs a token flow: ``install(site)`` patches ``site.block`` so it calls
    ``site.enter`` and ``site.between`` (see variants/flow.py) and returns the undo."""

    label: str
    matches: Callable[[nn.Module], bool]
    install: Callable[[BlockSite], Callable[[], None]]


def install_forward(module: nn.Module, forward: Callable) -> Callable[[], None]:
    """Shadow ``module.forward`` with an instance attribute; the returned undo restores it exactly."""
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.__dict__["forward"] = forward

    def undo() -> None:
        if had:
            module.__dict__["forward"] = previous
        else:
            module.__dict__.pop("forward", None)

    return undo


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype, *, true_means_masked: bool) -> torch.Tensor | None:
    """A bool or float attention mask as an additive float mask (0 keep, −inf drop)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        drop = mask if true_means_masked else ~mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(drop, float("-inf"))
    return mask.to(dtype)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, N, H·d] → [B, H, N, d]."""
    b, n, _ = x.shape
    return x.reshape(b, n, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, d] → [B, N, H·d]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


@dataclass(frozen=True)
class HostAdapter:
    """What one host library's adapter module declares (its module-level ``ADAPTER``), read by patching/core.py.

    ``host`` is the library's import name: the adapter is consulted only once that library is imported (a
    model of it cannot exist otherwise; ``torch`` always is). ``looks_for`` and ``blocks`` name the classes it
    patches, for the one-line error on a model with none; ``kinds`` / ``block_kinds`` build the matchers (they
    may import the host library); the two ``install_*owner`` hooks add model-level hooks and return undos.
    """

    host: str
    looks_for: tuple[str, ...]
    kinds: Callable[[], list[AttentionKind]]
    blocks: tuple[str, ...] = ()
    block_kinds: Callable[[], list[BlockKind]] | None = None
    #: after attention sites are patched: e.g. a multimodal model marks its image tokens for the text tower
    install_owner: Callable[[nn.Module, dict], list[Callable[[], None]]] | None = None
    #: under a token flow: e.g. a backbone whose forward reshapes tokens to a grid learns the reduced count
    install_flow_owner: Callable[[nn.Module], list[Callable[[], None]]] | None = None
    #: for a model with no site: why, in words, if this host can tell (e.g. its attention classes compute
    #: attention themselves), for the one-line refusal
    explain: Callable[[nn.Module], str | None] | None = None


def restore_tokens(block: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """A block's output [B, N', C] at every input position, where a token flow reduced it (else unchanged).

    For readers of intermediate blocks (dense heads tapping several blocks)."""
    state = block.__dict__.get("_fnabench_flow")
    return output if state is None or state.flow is None else state.flow.restore(output)
