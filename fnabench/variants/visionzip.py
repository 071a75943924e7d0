"""VisionZip-style visual-token reduction as a token flow (written from the VisionZip paper's description).

At one block of a vision tower (``layers``, one index; default -2, the block whose output LLaVA reads),
the tokens are cut to ``tokens``: the *dominant* ones, those the CLS token attends to most (its attention
in that block, averaged over heads), and ``contextual`` merged ones: the remaining tokens are grouped
around targets spread evenly over them, each joining the target whose key is most similar (cosine, keys
averaged over heads), and every group becomes its mean. CLS and register tokens are kept.

Later blocks run on the reduced tokens, so a reader of that block's output (LLaVA's projector) gets
``tokens`` patch tokens; at the tower's end every input position gets its token back (dominant tokens
their own, grouped ones their group's), as for ToMe. The reduction happens after the block's attention
and before its MLP (the token-flow hook), which for the dominant tokens is the same as after the block;
a group's mean passes through the MLP once instead of being the mean of its members' MLP outputs.
"""

from __future__ import annotations

import torch

from fnabench.variants.component import FLOW, ComponentDecl
from fnabench.variants.flow import TokenFlow
from fnabench.variants.params import LayerSlice, Param, choice, parse_int, parse_int_or_auto, parse_slice
from fnabench.variants.tome import unmerge


def contextual_count(tokens: int, contextual: int | None) -> int:
    """Merged tokens among ``tokens``: as given, or about a sixth (VisionZip's 54 + 10 of 64)."""
    if contextual is not None:
        return min(contextual, tokens)
    return round(tokens * 10 / 64)


def cls_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, N]: the first token's softmax attention over all keys, averaged over heads (scale 1/√d)."""
    logits = (q[:, :, :1].float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, H, 1, N]
    return torch.softmax(logits, dim=-1).mean(dim=1)[:, 0]


def plan_reduction(scores: torch.Tensor, keys: torch.Tensor, prefix: int, dominant: int,
                   contextual: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which tokens survive and how the rest group: (dominant [B, D], targets [B, C], group [B, N]).

    ``scores`` [B, N] rank the tokens after the ``prefix``; ``keys`` [B, N, d] decide the groups. ``group``
    gives every token the index (0..C-1) of the contextual token it joins, -1 for prefix and dominant ones.
    Indices are positions in the full sequence, sorted.
    """
    b, n = scores.shape
    rest = torch.arange(prefix, n, device=scores.device)
    dominant = min(dominant, n - prefix)
    top = scores[:, prefix:].topk(dominant, dim=-1).indices.sort(dim=-1).values + prefix  # [B, D]
    taken = torch.zeros(b, n, dtype=torch.bool, device=scores.device)
    taken[:, :prefix] = True
    taken.scatter_(1, top, True)
    remaining = rest[None].expand(b, -1)[~taken[:, prefix:]].reshape(b, -1)  # [B, R], sorted
    group = torch.full((b, n), -1, dtype=torch.long, device=scores.device)
    r = remaining.shape[1]
    contextual = min(contextual, r)
    if contextual == 0:
        return top, remaining[:, :0], group
    pick = (torch.arange(contextual, device=scores.device) * r) // contextual  # evenly spread over the rest
    targets = remaining[:, pick]  # [B, C]
    unit = keys.float() / keys.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    rows = torch.arange(b, device=scores.device)[:, None]
    sim = unit[rows, remaining] @ unit[rows, targets].transpose(-1, -2)  # [B, R, C]
    joins = sim.argmax(dim=-1)  # [B, R]
    is_target = (remaining[:, :, None] == targets[:, None, :])  # a target joins its own group
    joins = torch.where(is_target.any(-1), is_target.float().argmax(-1), joins)
    group.scatter_(1, remaining, joins)
    return top, targets, group


class VisionZip(TokenFlow):
    """Dominant + contextual tokens after the attention of block ``layers`` (one index); see the module doc."""

    causal = False

    def start(self, x: torch.Tensor) -> None:
        super().start(x)
        self.where: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None

    def attention(self, q, k, attn_mask):
        if self.layer in self.layers:
            if self.num_prefix < 1:
                raise ValueError("visionzip ranks tokens by the CLS token's attention, and this tower has no CLS "
                                 "token; accepted: towers with a class token (CLIP, DINOv2, timm ViTs)")
            self.scores = cls_attention(q, k)
            self.keys = k.mean(dim=1)
        return attn_mask

    def between(self, layer, x):
        if layer not in self.layers or self.scores is None:
            return x
        scores, keys, self.scores, self.keys = self.scores, self.keys, None, None
        tokens = self.component["tokens"]
        patches = x.shape[1] - self.num_prefix
        if tokens >= patches:
            return x
        contextual = contextual_count(tokens, self.component["contextual"])
        top, targets, group = plan_reduction(scores, keys, self.num_prefix, tokens - contextual, contextual)
        b, n, c = x.shape
        rows = torch.arange(b, device=x.device)[:, None]
        # mean of each group: sums and counts scattered into the C contextual slots
        member = group >= 0
        slot = group.clamp(min=0)
        sums = torch.zeros(b, targets.shape[1] + 1, c, dtype=x.dtype, device=x.device)  # slot C: nobody's
        slot = torch.where(member, slot, targets.shape[1])
        sums.scatter_add_(1, slot[..., None].expand(-1, -1, c), x)
        counts = torch.zeros(b, targets.shape[1] + 1, dtype=x.dtype, device=x.device)
        counts.scatter_add_(1, slot, torch.ones_like(slot, dtype=x.dtype))
        merged = (sums / counts.clamp(min=1)[..., None])[:, :-1]
        out = torch.cat([x[:, : self.num_prefix], x[rows, top], merged], dim=1)
        # where each input position's token now is: prefix, dominant in order, then its group's slot
        where = torch.full((b, n), -1, dtype=torch.long, device=x.device)
        where[:, : self.num_prefix] = torch.arange(self.num_prefix, device=x.device)
        where[rows, top] = self.num_prefix + torch.arange(top.shape[1], device=x.device)
        start = self.num_prefix + top.shape[1]
        where = torch.where(member, start + slot, where)
        dropped = where < 0  # no contextual tokens: a dropped token is restored as its most similar dominant one
        if bool(dropped.any()):
            unit = keys.float() / keys.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
            nearest = (unit @ unit[rows, top].transpose(-1, -2)).argmax(dim=-1)  # [B, N]
            where = torch.where(dropped, self.num_prefix + nearest, where)
        self.where = where if self.where is None else where.gather(1, self.where)
        return out

    def finish(self, x):
        if self.where is None or x.shape[1] == self.tokens_in:
            return x
        return unmerge(x, self.where)


COMPONENT = ComponentDecl(
    "visionzip", FLOW,
    {
        "tokens": Param(parse_int, 64, "an integer >= 1", lambda v: v >= 1),
        "contextual": Param(parse_int_or_auto, None, "'auto' or an integer >= 0", lambda v: v is None or v >= 0),
        "layers": Param(parse_slice, LayerSlice(-2, None, single=True), "one block index such as -2",
                        lambda v: v.single),
        "tower": choice("image"),
    },
    # at block `layers` of a vision tower keep `tokens` patch tokens: the dominant ones by CLS attention plus
    # `contextual` merged ones (auto: about a sixth of `tokens`)
    "VisionZip-style: dominant tokens by CLS attention plus merged contextual ones, after one block",
    always_shown=frozenset({"tokens"}),
    flow_class=VisionZip,
)
