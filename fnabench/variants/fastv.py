"""FastV-style pruning of image tokens inside a language model, as a token flow (written from the FastV
paper's description).

In block ``layers`` (one index, K) of a multimodal model's language model, every image token is scored by
the attention it receives: the causal softmax attention of all queries, averaged over queries and heads.
After that block's attention, only the ``tokens`` best-scored image tokens and every text token go on;
later blocks, their KV cache included, never see the others, so the prefill and every decoding step
after it get cheaper. Positions (rotary embeddings), masks and position ids follow the kept tokens. At the
language model's end every input position gets a hidden state again (a pruned token keeps the one it had
when it was dropped), so the output has the sequence's length.

Which tokens are image tokens comes from the model's ``input_ids`` (adapters/transformers.py,
``install_owner``); decoding steps hold none and pass through.
"""

from __future__ import annotations

from typing import Any

import torch

from fnabench.variants.component import FLOW, ComponentDecl
from fnabench.variants.flow import TokenFlow
from fnabench.variants.params import LayerSlice, Param, choice, parse_int, parse_slice


def received_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, N]: causal softmax attention each key receives, averaged over queries and heads (one head at a time)."""
    b, h, n, d = q.shape
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    total = torch.zeros(b, n, dtype=torch.float32, device=q.device)
    for head in range(h):
        logits = (q[:, head].float() @ k[:, head].float().transpose(-1, -2)) * d ** -0.5
        total += torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1).mean(dim=1)
    return total / h


class FastV(TokenFlow):
    """Keep the ``tokens`` image tokens that receive most attention in block ``layers``; see the module doc."""

    causal = True

    def start(self, x: torch.Tensor) -> None:
        super().start(x)
        self.kept: torch.Tensor | None = None  # [B, N'] positions in the full sequence, sorted
        self.dropped_state: torch.Tensor | None = None  # [B, N, C] the sequence when it was pruned
        self.scores: torch.Tensor | None = None

    def _image_tokens(self, n: int) -> torch.Tensor | None:
        marks = getattr(self.state, "image_tokens", None)
        if marks is None or marks.shape[-1] != n:
            return None
        return marks

    def attention(self, q, k, attn_mask):
        if self.layer in self.layers and q.shape[2] == k.shape[2] > 1:  # the prefill, not a decoding step
            self.scores = received_attention(q, k)
        return attn_mask

    def between(self, layer, x):
        if layer not in self.layers or self.scores is None:
            return x
        scores, self.scores = self.scores, None
        image = self._image_tokens(x.shape[1])
        if image is None:
            raise ValueError("fastv prunes image tokens, and this forward marks none: patch the whole LLaVA-family "
                             "model (its input_ids mark them), not its language model alone")
        counts = image.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise ValueError("fastv needs the same number of image tokens in every row of a batch; accepted: "
                             "batch size 1 or one image layout per batch")
        keep_images = min(self.component["tokens"], int(counts[0]))
        if keep_images >= int(counts[0]):
            return x
        ranked = scores.masked_fill(~image, float("-inf")).topk(keep_images, dim=-1).indices
        keep = ~image
        keep.scatter_(1, ranked, True)
        b = x.shape[0]
        self.kept = torch.nonzero(keep)[:, 1].reshape(b, -1)
        self.dropped_state = x
        return x.gather(1, self.kept[..., None].expand(-1, -1, x.shape[-1]))

    def inputs_for(self, n: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A decoder block's keyword inputs narrowed to the kept tokens (``n`` of them) once tokens are pruned:
        rotary ``position_embeddings``, ``position_ids`` and a 4-D ``attention_mask``."""
        if self.kept is None or n != self.kept.shape[1]:
            return kwargs
        full = self.tokens_in
        kept = self.kept
        out = dict(kwargs)
        pe = kwargs.get("position_embeddings")
        if isinstance(pe, tuple) and pe[0].shape[-2] == full:
            out["position_embeddings"] = tuple(_rows(t.expand(kept.shape[0], *t.shape[1:]), kept) for t in pe)
        ids = kwargs.get("position_ids")
        if isinstance(ids, torch.Tensor) and ids.shape[-1] == full:
            out["position_ids"] = ids.expand(kept.shape[0], -1).gather(1, kept)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-1] == full:
            m = mask.expand(kept.shape[0], *mask.shape[1:])
            m = m.gather(2, kept[:, None, :, None].expand(-1, m.shape[1], -1, full))
            out["attention_mask"] = m.gather(3, kept[:, None, None, :].expand(-1, m.shape[1], m.shape[2], -1))
        return out

    def finish(self, x):
        if self.kept is None or x.shape[1] == self.tokens_in:
            return x
        out = self.dropped_state.clone()
        out.scatter_(1, self.kept[..., None].expand(-1, -1, x.shape[-1]), x)
        return out


def _rows(t: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Rows ``kept`` [B, N'] of ``t`` [B, N, d] along dim 1."""
    return t.gather(1, kept[..., None].expand(-1, -1, t.shape[-1]))


COMPONENT = ComponentDecl(
    "fastv", FLOW,
    {
        "tokens": Param(parse_int, 64, "an integer >= 0", lambda v: v >= 0),
        "layers": Param(parse_slice, LayerSlice(2, None, single=True), "one block index such as 2",
                        lambda v: v.single),
        "tower": choice("text"),
    },
    # in a multimodal model's language model, after the attention of block `layers`, keep the `tokens` image
    # tokens that receive most attention, and every text token
    "FastV-style: the most attended image tokens kept after one block of the language model",
    always_shown=frozenset({"tokens"}),
    flow_class=FastV,
)
