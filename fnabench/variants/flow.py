"""Token-flow variants: methods that change how many tokens flow through later blocks.

Attention variants replace the token mixing inside a block; a token flow acts between blocks' parts.
Adapters patch each block of a tower (adapters/core.py, ``BlockKind``) so that it runs

    x = x + attention(norm1(x))       # the variant's attention hands the flow q and k (:meth:`attention`)
    x = flow.between(layer, x)        # the flow may merge or drop tokens here, between attention and MLP
    x = x + mlp(norm2(x))

and the tower's last block ends with :meth:`TokenFlow.finish`, which gives every input position a token
again (dense heads, pooling and intermediate taps see the original token grid). ToMe (variants/tome.py: ``r``
tokens merged per block) is the first member; VisionZip-style reduction (variants/visionzip.py: dominant and
merged contextual tokens after block k) and FastV-style pruning (variants/fastv.py: image tokens with little
attention dropped inside a decoder, ``causal = True``) are the others, each a subclass of :class:`TokenFlow`
with its own ``between`` and ``finish``, named by its component declaration (``ComponentDecl.flow_class``;
variants/flows.py looks it up).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # the registry (imported by spec.py) imports the flows, which import this module
    from fnabench.variants.spec import Component


class TokenFlow:
    """Per-forward state of a token flow in one tower; :meth:`start` resets it at block 0."""

    #: whether it runs in causal towers (decoders) rather than in encoders
    causal = False

    def __init__(self, component: Component, num_layers: int, num_prefix: int, state: Any = None) -> None:
        self.component = component
        self.state = state  # the tower's ForwardState (what the adapter knows about this forward)
        self.num_layers = num_layers
        self.num_prefix = num_prefix
        self.layers = set(component["layers"].resolve(num_layers))
        self.layer = 0
        self.tokens_in = 0
        self.counts: list[int] = []  # tokens entering each block of the last forward

    def start(self, x: torch.Tensor) -> None:
        """Block 0 begins a forward with ``x`` [B, N, C]: every position is its own token."""
        self.tokens_in = x.shape[1]
        self.counts = []

    def enter(self, layer: int, x: torch.Tensor) -> None:
        """Block ``layer`` starts on ``x``."""
        if layer == 0:
            self.start(x)
        self.layer = layer
        self.counts.append(int(x.shape[1]))

    def attention(self, q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Called by the variant with the block's [B, H, N, d] q and k; returns the mask attention uses."""
        return attn_mask

    def between(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The residual stream after block ``layer``'s attention, before its MLP: reduce it here."""
        return x

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The tower's output, [B, N_in, C] again where the flow reduced it."""
        return x

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """A block's output read from outside the flow (an intermediate tap): at the original positions."""
        return self.finish(x)
