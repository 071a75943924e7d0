"""The suppression ablation: remove one kind of token with the ``mask`` variant and watch the other.

Massive tokens and artifact tokens are said to suppress one another through attention (fna.md §7.1:
"artifact tokens emerge when massive tokens are removed"; "masking one sink promotes a dormant token").
:func:`ablate` analyses the model twice on the same inputs, with exact attention and with
``mask:tokens=KIND,action=keys|values,layers=...`` (the mask variant's own detector, at the analysis's
ratios), and compares: the other kind's count and norms per layer, tokens that become the other kind,
which token is the top attention sink in each layer and whether a token that was not one takes over,
and how far the output moves (cosine similarity).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fnabench.analysis.analyze import analyze, cos_sim
from fnabench.analysis.capture import AnalysisInputError
from fnabench.analysis.report import KINDS, Report, Thresholds
from fnabench.models.loaded import LoadedModel

#: what ``--ablate`` removes: a norm-detected kind, or (decoders) the first token by position
ABLATE_KINDS = ("massive", "artifact", "first")
ACTIONS = ("keys", "values")


def mask_spec(kind: str, action: str = "keys", layers: str = ":", thresholds: Thresholds | None = None) -> str:
    """The ``mask`` variant that removes ``kind`` at the analysis's ratios."""
    if kind not in ABLATE_KINDS:
        raise AnalysisInputError(f"--ablate {kind!r}: accepted: {', '.join(ABLATE_KINDS)}")
    if action not in ACTIONS:
        raise AnalysisInputError(f"--action {action!r}: accepted: {', '.join(ACTIONS)}")
    t = thresholds or Thresholds()
    spec = f"mask:tokens={kind},action={action},layers={layers}"
    if kind != "first":
        spec += f",artifact_ratio={t.artifact_ratio:g},massive_ratio={t.massive_ratio:g}"
    return spec


def other_kind(kind: str) -> str:
    """The kind whose response the ablation of ``kind`` measures."""
    return "artifact" if kind in ("massive", "first") else "massive"


@dataclass
class Ablation:
    """Before (exact attention) and after (``spec`` patched in) on the same inputs, and their comparison."""

    kind: str
    action: str
    layers: str
    spec: str
    before: Report
    after: Report

    @property
    def other(self) -> str:
        return other_kind(self.kind)

    @property
    def masked_layers(self) -> np.ndarray:
        """Attention layers in which the mask removed at least one token of some input."""
        return np.flatnonzero(self.after.arrays["masked"].any(axis=(0, 2)))

    def cos_sim(self) -> np.ndarray:
        """Per input: cosine similarity of the model's output after the ablation to its output before."""
        return cos_sim(self.after.arrays["features"], self.before.arrays["features"]).numpy()

    def per_layer(self) -> list[dict[str, Any]]:
        """Per residual state: the other kind before/after (count, tokens that became it, how much the
        before-set grew), max norm ratio, and per block the top sink before/after and takeovers."""
        b, a, other = self.before, self.after, self.other
        before_set = getattr(b, other)
        after_set = getattr(a, other)
        body = slice(b.num_prefix, None)
        rows = []
        for layer in range(b.depth + 1):
            grown = a.ratio[:, layer][before_set[:, layer]] / b.ratio[:, layer][before_set[:, layer]]
            row: dict[str, Any] = {
                "layer": layer,
                f"{other}_before": float(before_set[:, layer].sum(axis=-1).mean()),
                f"{other}_after": float(after_set[:, layer].sum(axis=-1).mean()),
                "emerged": float((after_set[:, layer] & ~before_set[:, layer]).sum(axis=-1).mean()),
                "growth": float(np.median(grown)) if grown.size else None,
                "max_ratio_before": float(np.median(b.ratio[:, layer, body].max(axis=-1))),
                "max_ratio_after": float(np.median(a.ratio[:, layer, body].max(axis=-1))),
            }
            if layer < b.depth:
                row.update(self._sinks(layer))
            rows.append(row)
        return rows

    def _sinks(self, layer: int) -> dict[str, Any]:
        """Block ``layer``: what was removed, and per head whether the sink it lost was taken over.

        A head *lost its sink* when its most attended token before was removed and held ≥ ``sink_share`` of
        the head's attention. After the ablation the removed token may still be its most attended (*kept*: zeroed
        values leave attention where it was), another unremoved token holding ≥ ``sink_share`` may be (*taken
        over*), or the attention spread out.
        """
        b, a = self.before, self.after
        s = b.thresholds.sink_share
        masked = a.arrays["masked"][:, layer]  # [I, N]
        was, was_share = b.top_token[:, layer], b.top_token_share[:, layer]  # [I, H]
        now, now_share = a.top_token[:, layer], a.top_token_share[:, layer]
        lost = np.take_along_axis(masked, was, axis=1) & (was_share >= s)
        kept = lost & (now == was)  # zeroed values leave the attention where it was
        taken = lost & (now_share >= s) & ~np.take_along_axis(masked, now, axis=1) & (now != was)
        inputs, heads = np.nonzero(taken)
        removed_mass = (b.arrays["received"][:, layer].mean(axis=1) * masked).sum(axis=-1)
        return {
            "masked": float(masked.sum(axis=-1).mean()),
            "masked_share_before": float(removed_mass.mean()),
            "top_share_before": float(b.top_share[:, layer].mean()),
            "top_share_after": float(a.top_share[:, layer].mean()),
            "top_sink_before": int(np.bincount(b.top_sink[:, layer]).argmax()),
            "top_sink_after": int(np.bincount(a.top_sink[:, layer]).argmax()),
            "sink_heads_lost": float(lost.sum(axis=-1).mean()),
            "sink_heads_taken_over": float(taken.sum(axis=-1).mean()),
            "lost": int(lost.sum()), "taken": int(taken.sum()), "kept": int(kept.sum()),
            "new_sinks": [[int(p), int(c)] for p, c in Counter(now[inputs, heads].tolist()).most_common(3)],
            "new_sink_kinds": _kinds_of(b, now[inputs, heads], inputs),
            "new_sink_share": float(now_share[inputs, heads].mean()) if taken.any() else None,
        }

    def metrics(self) -> dict[str, float]:
        """The after-analysis's metrics plus the ablation's own: output similarity, emergence, takeover."""
        rows = self.per_layer()
        late = [r for r in rows if r["layer"] >= self.before.thresholds.from_layer]
        blocks = [r for r in rows if "masked" in r]
        lost, taken = sum(r["lost"] for r in blocks), sum(r["taken"] for r in blocks)
        sims = self.cos_sim()
        return {**self.after.metrics(), "cos_sim": float(sims.mean()), "cos_sim_min": float(sims.min()),
                "emerged_tokens": float(max((r["emerged"] for r in late), default=0.0)),
                "sink_heads_lost": float(lost / self.before.count),
                "takeover_percent": float(100 * taken / lost) if lost else 0.0}

    def verdict(self) -> list[str]:
        """Plain sentences: what was removed and what the other kind and the sinks did."""
        rows, m = self.per_layer(), self.metrics()
        late = [r for r in rows if r["layer"] >= self.before.thresholds.from_layer]
        blocks = [r for r in rows if r.get("masked", 0) > 0]
        what = {"first": "the first token"}.get(self.kind, f"{self.kind} tokens")
        if not blocks:
            return [f"Removing {what} ({self.action}, blocks {self.layers}) removes nothing here: the mask variant "
                    f"finds no such token; the output is unchanged (cos_sim {m['cos_sim']:.4f})."]
        names = ", ".join(str(r["layer"]) for r in blocks)
        removed = max(r["masked"] for r in blocks)
        share = max(r["masked_share_before"] for r in blocks)
        lines = [f"Removing {what} as {self.action} removed up to {removed:.2f} tokens per input in block(s) {names}; "
                 f"they had drawn up to {share:.3f} of a block's attention. Output cos_sim {m['cos_sim']:.4f} "
                 f"(worst input {m['cos_sim_min']:.4f})."]
        other = self.other
        before = max(r[f"{other}_before"] for r in late)
        after = max(r[f"{other}_after"] for r in late)
        growth = [r["growth"] for r in late if r["growth"] is not None]
        lines.append(f"{other.capitalize()} tokens: up to {before:.2f} per input before, {after:.2f} after; up to "
                     f"{m['emerged_tokens']:.2f} per input newly became {other}"
                     + (f"; the norms of the tokens that were {other} changed by ×{np.median(growth):.2f} (median)"
                        if growth else "") + ".")
        moved = max((r for r in rows if "masked" in r), key=lambda r: abs(r["top_share_after"] - r["top_share_before"]))
        if abs(moved["top_share_after"] - moved["top_share_before"]) >= 0.05:
            token = moved["top_sink_after"]
            removed = self.after.arrays["masked"][:, moved["layer"], token].mean() > 0.5
            lines.append(f"The most attended token (head mean) changed most in block {moved['layer']}: token "
                         f"{moved['top_sink_before']} with {moved['top_share_before']:.3f} of the attention before, "
                         f"token {token}{' (a removed one)' if removed else ''} with {moved['top_share_after']:.3f} "
                         "after.")
        lost = sum(r["lost"] for r in blocks)
        if not lost:
            lines.append(f"No head had its sink (≥ {self.before.thresholds.sink_share:g} of its attention on one "
                         "token) among the removed tokens.")
        else:
            kinds: Counter = Counter()
            for r in blocks:
                kinds.update(r["new_sink_kinds"])
            kept = 100 * sum(r["kept"] for r in blocks) / lost
            spread = 100 - m["takeover_percent"] - kept
            were = f" (before, those tokens were: {', '.join(f'{k} {c}' for k, c in kinds.most_common())})" \
                if kinds else ""
            lines.append(f"Sinks: {lost} (input, block, head) sinks were on removed tokens. After: "
                         + (f"still the head's most attended token in {kept:.0f} % (zeroed values leave the "
                            "attention where it was), " if kept else "")
                         + f"taken over by another token in {m['takeover_percent']:.0f} %{were}, spread out over the "
                         f"other tokens in {spread:.0f} %.")
        return lines

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the spec, metrics, verdict and per-layer comparison."""
        return {"kind": self.kind, "action": self.action, "layers": self.layers, "spec": self.spec,
                "other": self.other, "metrics": self.metrics(), "verdict": self.verdict(),
                "per_layer": self.per_layer(), "masked_layers": self.masked_layers.tolist()}


def _kinds_of(report: Report, tokens: np.ndarray, inputs: np.ndarray) -> dict[str, int]:
    """How the tokens that took over were classified before the ablation ('dormant': not listed)."""
    out: dict[str, int] = {}
    for i, p in zip(inputs.tolist(), tokens.tolist(), strict=True):
        k = report.kind[i, p]
        name = KINDS[k] if k >= 0 else "dormant"
        out[name] = out.get(name, 0) + 1
    return out


def ablate(model: nn.Module | LoadedModel, inputs: Any, kind: str, *, action: str = "keys", layers: str = ":",
           thresholds: Thresholds | None = None, before: Report | None = None, **options: Any) -> Ablation:
    """Analyse ``model`` on ``inputs`` with exact attention (or reuse ``before``) and with ``kind`` removed
    (:func:`mask_spec`), and return the :class:`Ablation` comparing the two. ``options`` go to :func:`analyze`."""
    thresholds = thresholds or (before.thresholds if before is not None else Thresholds())
    spec = mask_spec(kind, action, layers, thresholds)
    if before is None:
        before = analyze(model, inputs, thresholds=thresholds, **options)
    with torch.random.fork_rng():
        after = analyze(model, inputs, variant=spec, thresholds=thresholds, **options)
    if after.arrays["norms"].shape != before.arrays["norms"].shape:
        raise AnalysisInputError("ablation: the before and after analyses saw different inputs")
    return Ablation(kind, action, layers, after.variant, before, after)
