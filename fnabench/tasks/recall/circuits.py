"""The recall GPT-2 with a disentangled residual stream: the computation graph edge pruning works on.

In a transformer the residual stream is a sum of *writers*: the embedding (read-in + position), every
attention head's output (its slice of the output projection, with 1/H of the projection's bias) and every
MLP. Each *reader* — every head's query, key and value input, every MLP input, and the final read-out —
sees that sum. Here every reader gets its own sum, one term per edge (writer → reader), so an edge can be
switched off: its term then comes from a *corrupted* run (the same model on an input with one token
swapped) instead of the clean one. With every edge on, the model is the original one (tested).

:class:`CircuitModel` runs a trained :class:`~fnabench.tasks.recall.network.RecallGPT2` this way with its
own weights (nothing copied or changed), plainly (with per-layer residual patches for activation patching)
or with a mask on the edges. :class:`EdgeGraph` names the writers, the readers and the allowed edges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

QKV = ("q", "k", "v")


@dataclass(frozen=True)
class EdgeGraph:
    """Writers, readers and which writer each reader can see (the ones before it) for L layers of H heads.

    Writers: ``emb``, then per layer ``aL.hH`` (each head) and ``mL`` (the MLP). Readers: per layer
    ``aL.hH.q|k|v`` and ``mL``, then ``out``. A layer's heads see the embedding and every earlier layer;
    its MLP also sees its own heads; ``out`` sees everything.
    """

    n_layer: int
    n_head: int

    @property
    def writers(self) -> list[str]:
        names = ["emb"]
        for layer in range(self.n_layer):
            names += [f"a{layer}.h{h}" for h in range(self.n_head)] + [f"m{layer}"]
        return names

    @property
    def readers(self) -> list[str]:
        names = []
        for layer in range(self.n_layer):
            names += [f"a{layer}.h{h}.{kind}" for kind in QKV for h in range(self.n_head)] + [f"m{layer}"]
        return [*names, "out"]

    def attention_writers(self, layer: int) -> int:
        """How many writers the heads of ``layer`` see (the first ones in :attr:`writers`)."""
        return 1 + layer * (self.n_head + 1)

    def mlp_writers(self, layer: int) -> int:
        return self.attention_writers(layer) + self.n_head

    def attention_readers(self, layer: int) -> slice:
        """Rows of the layer's 3H query/key/value readers (q for every head, then k, then v)."""
        start = layer * (3 * self.n_head + 1)
        return slice(start, start + 3 * self.n_head)

    def mlp_reader(self, layer: int) -> int:
        return layer * (3 * self.n_head + 1) + 3 * self.n_head

    def allowed(self) -> torch.Tensor:
        """[readers, writers] boolean: the edges that exist."""
        out = torch.zeros(len(self.readers), len(self.writers), dtype=torch.bool)
        for layer in range(self.n_layer):
            out[self.attention_readers(layer), : self.attention_writers(layer)] = True
            out[self.mlp_reader(layer), : self.mlp_writers(layer)] = True
        out[-1, :] = True
        return out

    def edges(self) -> list[tuple[str, str]]:
        """Every allowed (writer, reader) pair, row-major over readers: the order of flattened edge vectors."""
        writers, readers = self.writers, self.readers
        return [(writers[w], readers[r]) for r, w in self.allowed().nonzero().tolist()]

    def writer_of(self, reader: str) -> str | None:
        """The writer a reader belongs to (a head's q/k/v → that head, an MLP → itself, ``out`` → None)."""
        if reader == "out":
            return None
        return reader.rsplit(".", 1)[0] if reader.startswith("a") else reader


class CircuitModel(nn.Module):
    """A trained RecallGPT2 computed writer by writer, with optional edge masks and residual patches."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        backbone = model.backbone
        config = backbone.config
        self.n_layer, self.n_head, self.d = config.n_layer, config.n_head, config.n_embd
        self.head_dim = self.d // self.n_head
        self.graph = EdgeGraph(self.n_layer, self.n_head)
        for p in model.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------------------ pieces

    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Read-in plus learned positions, for tokens that sit at positions ``start``, ``start`` + 1, …"""
        positions = torch.arange(start, start + tokens.shape[-2], device=tokens.device)
        return self.model.read_in(tokens) + self.model.backbone.wpe(positions)

    def _heads(self, layer: int, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor,
               prefix: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Head outputs [H, B, t, d] from per-head (or shared, broadcast) inputs [H or 1, B, t, d] (before ln_1),
        and this call's keys and values [H, B, t, hd]. ``prefix``: keys and values of the positions before these t
        (they are attended to as well; the t queries sit right after them)."""
        block = self.model.backbone.h[layer]
        h, hd, d = self.n_head, self.head_dim, self.d
        weight, bias = block.attn.c_attn.weight, block.attn.c_attn.bias  # Conv1D: x @ W + b, W [d, 3d]

        def project(x, part):
            w = weight[:, part * d:(part + 1) * d].reshape(d, h, hd).permute(1, 0, 2)  # [H, d, hd]
            b = bias[part * d:(part + 1) * d].reshape(h, 1, 1, hd)
            return torch.einsum("hbtd,hde->hbte", block.ln_1(x).expand(h, *x.shape[1:]), w) + b

        q, k, v = project(q_in, 0), project(k_in, 1), project(v_in, 2)
        keys, values = (k, v) if prefix is None else (torch.cat([prefix[0], k], -2), torch.cat([prefix[1], v], -2))
        t, offset = q.shape[-2], keys.shape[-2] - q.shape[-2]
        scores = q @ keys.transpose(-1, -2) / math.sqrt(hd)
        causal = torch.arange(offset + t, device=q.device)[None, :] <= torch.arange(offset, offset + t,
                                                                                     device=q.device)[:, None]
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        z = scores.softmax(dim=-1) @ values  # [H, B, t, hd]
        proj_w = block.attn.c_proj.weight.reshape(h, hd, d)
        return torch.einsum("hbte,hed->hbtd", z, proj_w) + block.attn.c_proj.bias / h, (k, v)

    def _mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        block = self.model.backbone.h[layer]
        return block.mlp(block.ln_2(x))

    def _readout(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.read_out(self.model.backbone.ln_f(x))

    # ------------------------------------------------------------------------------ runs

    def run(self, tokens: torch.Tensor, patch: dict[int, tuple[int, torch.Tensor]] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Plain forward pass: (predictions [B, T, n], writer outputs [W, B, T, d], residual stream at the input
        of each layer and before the read-out, L + 1 tensors [B, T, d]). ``patch`` {layer: (position, value)}
        overwrites the residual stream at one position where layer ``layer`` reads it (``n_layer``: the read-out)."""
        pred, writers, residuals, _ = self.run_all(tokens, patch)
        return pred, writers, residuals

    def keys_values(self, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's per-head keys and values [H, B, T, hd] in a plain forward pass (for :meth:`run_masked`'s
        ``prefix``)."""
        return self.run_all(tokens)[3]

    def run_all(self, tokens: torch.Tensor, patch: dict[int, tuple[int, torch.Tensor]] | None = None):
        """:meth:`run`'s three results and :meth:`keys_values`' from one forward pass."""
        patch = patch or {}
        resid = self.embed(tokens)
        writers, residuals, kv = [resid], [], []
        for layer in range(self.n_layer + 1):
            if layer in patch:
                pos, value = patch[layer]
                resid = resid.clone()
                resid[:, pos] = value
            residuals.append(resid)
            if layer == self.n_layer:
                break
            heads, layer_kv = self._heads(layer, resid[None], resid[None], resid[None])
            kv.append(layer_kv)
            writers += list(heads)
            resid = resid + heads.sum(0)
            mlp = self._mlp(layer, resid)
            writers.append(mlp)
            resid = resid + mlp
        return self._readout(resid), torch.stack(writers), residuals, kv

    def run_masked(self, tokens: torch.Tensor, mask: torch.Tensor, corrupt: torch.Tensor, start: int = 0,
                   prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Forward pass in which reader r sees Σ_w mask[r, w]·clean_w + (1 − mask[r, w])·corrupt_w over the
        writers before it. ``mask`` [R, W] (values in [0, 1]; disallowed entries ignored), ``corrupt``
        [W, B, T, d] the writer outputs of the corrupted run (:meth:`run`). Returns predictions [B, T, n].

        Where the clean and corrupted inputs agree on every position before ``start``, every writer agrees there
        too (the model is causal), so no mask changes anything before ``start``. Then only positions ``start``…
        are computed: ``tokens`` [B, t, dim] and ``corrupt`` [W, B, t, d] hold just those t positions, ``prefix``
        is :meth:`keys_values` of the clean input (its first ``start`` positions are used), and the predictions
        [B, t, n] are those of positions ``start``…"""
        g = self.graph
        mask = mask * g.allowed().to(mask)
        if start:
            if prefix is None:
                raise ValueError("run_masked(start > 0) needs the clean run's keys and values (prefix)")
            prefix = [(k[..., :start, :], v[..., :start, :]) for k, v in prefix]
        clean = [self.embed(tokens, start)]
        for layer in range(self.n_layer):
            seen = g.attention_writers(layer)
            x = self._mixed(clean, corrupt, mask[g.attention_readers(layer), :seen], seen)  # [3H, B, t, d]
            h = self.n_head
            heads, _ = self._heads(layer, x[:h], x[h:2 * h], x[2 * h:], prefix[layer] if start else None)
            clean += list(heads)
            seen = g.mlp_writers(layer)
            x = self._mixed(clean, corrupt, mask[g.mlp_reader(layer), :seen][None], seen)[0]
            clean.append(self._mlp(layer, x))
        x = self._mixed(clean, corrupt, mask[-1:, :], len(clean))[0]
        return self._readout(x)

    @staticmethod
    def _mixed(clean: list[torch.Tensor], corrupt: torch.Tensor, rows: torch.Tensor, seen: int) -> torch.Tensor:
        """Per-reader inputs [r, B, T, d]: the corrupted residual plus each kept edge's (clean − corrupt)."""
        diff = torch.stack(clean[:seen]) - corrupt[:seen]
        return corrupt[:seen].sum(0) + torch.einsum("rw,wbtd->rbtd", rows, diff)
