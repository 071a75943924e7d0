"""Token merging by bipartite soft matching (ToMe, Bolya et al., ICLR 2023), as pure tensor math.

Written from the paper's description: the tokens after the protected prefix are split alternately into
two sets A and B; each A token is joined by an edge to its most similar B token (cosine similarity of
the attention keys, averaged over heads); the r most similar edges are kept and each of those A tokens
is merged into its B token by a size-weighted average. Sizes add up, so a merged token knows how many
input patches it stands for, and :class:`MergePlan` also says where each original position went, so a
dense output can be expanded back to every position (:func:`unmerge`). :class:`ToMe` runs it as a token
flow (variants/flow.py): ``r`` tokens merged after the attention of each block in ``layers``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fnabench.variants.component import FLOW, ComponentDecl
from fnabench.variants.flow import TokenFlow
from fnabench.variants.params import LAYERS, Param, choice, parse_bool, parse_int


@dataclass
class MergePlan:
    """One merging step on [B, N, ·] tokens: which A tokens stay, which merge into which B token.

    Token order after the step: the ``prefix`` protected tokens, the kept A tokens (in their original
    order), then every B token (merged or not, in order).
    """

    prefix: int
    kept: torch.Tensor  # [B, Na - r] indices into A
    merged: torch.Tensor  # [B, r] indices into A
    into: torch.Tensor  # [B, r] indices into B: where each merged A token goes
    num_a: int
    num_b: int

    @property
    def tokens_after(self) -> int:
        return self.prefix + self.kept.shape[1] + self.num_b

    def new_index(self, num_tokens: int) -> torch.Tensor:
        """[B, N]: for every token before the step, the index of the token that holds it after."""
        b = self.kept.shape[0]
        device = self.kept.device
        out = torch.empty(b, num_tokens, dtype=torch.long, device=device)
        out[:, : self.prefix] = torch.arange(self.prefix, device=device)
        a_pos = self.prefix + 2 * torch.arange(self.num_a, device=device)  # A: even offsets after the prefix
        b_pos = self.prefix + 2 * torch.arange(self.num_b, device=device) + 1
        start_b = self.prefix + self.kept.shape[1]
        out[:, b_pos] = start_b + torch.arange(self.num_b, device=device)
        rows = torch.arange(b, device=device)[:, None]
        out[rows, a_pos[self.kept]] = self.prefix + torch.arange(self.kept.shape[1], device=device)
        out[rows, a_pos[self.merged]] = start_b + self.into
        return out


def plan_merge(metric: torch.Tensor, r: int, prefix: int = 0) -> MergePlan | None:
    """Bipartite soft matching on ``metric`` [B, N, C]: the plan that removes ``r`` tokens, or None if r = 0.

    The first ``prefix`` tokens (CLS, registers) never merge. ``r`` is capped at the size of set A.
    """
    rest = metric[:, prefix:]
    num_a, num_b = (rest.shape[1] + 1) // 2, rest.shape[1] // 2
    r = min(r, num_a if num_b else 0)
    if r <= 0:
        return None
    with torch.no_grad():
        rest = rest / rest.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        a, b = rest[:, ::2], rest[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # [B, Na, Nb] cosine similarities
        best, match = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        merged = order[:, :r]
        kept = order[:, r:].sort(dim=-1).values  # keep spatial order among the survivors
        into = match.gather(1, merged)
    return MergePlan(prefix, kept, merged, into, num_a, num_b)


def merge(x: torch.Tensor, size: torch.Tensor, plan: MergePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``plan`` to tokens ``x`` [B, N, C] of sizes ``size`` [B, N, 1]: size-weighted averages."""
    weighted = x * size
    out = _combine(weighted, plan)
    new_size = _combine(size, plan)
    return out / new_size, new_size


def _combine(t: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Sum each merged A row into its B row; order: prefix, kept A, B."""
    c = t.shape[-1]
    head, rest = t[:, : plan.prefix], t[:, plan.prefix:]
    a, b = rest[:, ::2], rest[:, 1::2]
    kept = a.gather(1, plan.kept[..., None].expand(-1, -1, c))
    src = a.gather(1, plan.merged[..., None].expand(-1, -1, c))
    b = b.scatter_add(1, plan.into[..., None].expand(-1, -1, c), src)
    return torch.cat([head, kept, b], dim=1)


def unmerge(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Tokens [B, N', C] back at their original positions: ``where`` [B, N] gives, per position, its token."""
    return x.gather(1, where[..., None].expand(-1, -1, x.shape[-1]))


# ---------------------------------------------------------------------------------------------
# the token flow and the component


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


COMPONENT = ComponentDecl(
    "tome", FLOW,
    {
        "r": Param(parse_int, 8, "an integer >= 0", lambda v: v >= 0),
        "layers": LAYERS,
        "tower": choice("image"),
        "prop_attn": Param(parse_bool, True, "true | false"),
    },
    # after the attention of each block in `layers`, r tokens merged by bipartite soft matching on the keys,
    # sizes tracked and weighed by attention (prop_attn); at the tower's end copied back to every position
    "token merging (ToMe): r tokens merged per block, unmerged at the tower's end",
    always_shown=frozenset({"r"}),
    flow_class=ToMe,
)
