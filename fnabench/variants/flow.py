"""Token-flow variants: methods that change how many tokens flow through later blocks.

Attention variants replace the token mixing inside a block; a token flow acts between blocks' parts.
Adapters patch each block of a tower (adapters/core.py, ``BlockKind``) so that it runs

    x = x + attention(norm1(x))       # the variant's attention hands the flow q and k (:meth:`attention`)
    x = flow.between(layer, x)        # the flow may merge or drop tokens here, between attention and MLP
    x = x + mlp(norm2(x))

and the tower's last block ends with :meth:`TokenFlow.finish`, which gives every input position a token
again (dense heads, pooling and intermediate taps see the original token grid). :class:`ToMe` is the first
member; VisionZip-style reduction (variants/visionzip.py: dominant and merged contextual tokens after block
k) and FastV-style pruning (variants/fastv.py: image tokens with little attention dropped inside a decoder,
``causal = True``) are the others, each a subclass of :class:`TokenFlow` with its own ``between`` and ``finish``.
"""

from __future__ import annotations

from typing import Any

import torch

from fnabench.variants.spec import Component
from fnabench.variants.tome import merge, plan_merge, unmerge


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


class ToMe(TokenFlow):
    """Token merging: ``r`` tokens merged per block in ``layers`` by bipartite soft matching on the keys,
    sizes tracked, proportional attention (``prop_attn``: logits + log size), unmerged at the end."""

    def start(self, x: torch.Tensor) -> None:
        super().start(x)
        self.size: torch.Tensor | None = None  # [B, N, 1] patches per token, None until the first merge
        self.where: torch.Tensor | None = None  # [B, N_in]: each input position's token
        self.metric: torch.Tensor | None = None

    def attention(self, q, k, attn_mask):
        if self.layer in self.layers:
            self.metric = k.mean(dim=1)  # keys averaged over heads: [B, N, d]
        if self.size is None or not self.component["prop_attn"]:
            return attn_mask
        bias = self.size.log().to(q.dtype).transpose(1, 2)[:, None]  # [B, 1, 1, N]
        if attn_mask is None:
            return bias
        if attn_mask.dtype == torch.bool:
            return bias.masked_fill(~attn_mask, float("-inf"))
        return attn_mask + bias

    def between(self, layer, x):
        metric, self.metric = self.metric, None
        if layer not in self.layers or metric is None:
            return x
        plan = plan_merge(metric, self.component["r"], self.num_prefix)
        if plan is None:
            return x
        size = self.size if self.size is not None else torch.ones_like(x[..., :1])
        step = plan.new_index(x.shape[1])
        self.where = step if self.where is None else step.gather(1, self.where)
        x, self.size = merge(x, size, plan)
        return x

    def finish(self, x):
        if self.where is None or x.shape[1] == self.tokens_in:
            return x
        return unmerge(x, self.where)
