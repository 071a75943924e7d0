"""What the analysis finds, from the captured arrays: outlier tokens, their kind, the attention they draw.

Criteria (all configurable in :class:`Thresholds`):

- **norm ratio**: a token's residual-stream L2 norm over the median norm of the image's patch tokens
  (CLS and registers excluded from the median; in a decoder, every token). ≥ ``artifact_ratio`` is an
  *artifact* token, ≥ ``massive_ratio`` a *massive* one: the ``mask`` variant's own detector, so the
  analysis finds what ``mask:tokens=...`` would remove (for a decoder, the mask variant judges each token
  against the median of the tokens before it, so it can never pick position 0; ``mask:tokens=first`` does).
- **massive activation** (Sun et al. 2024): a single scalar with |x| > ``activation`` and ≥
  ``activation_factor`` × the median |x| of that hidden state; such a token counts as massive too, and
  the feature dimensions holding those scalars are reported.
- **attention sink**: a token that receives ≥ ``sink_share`` of one head's attention mass (the mean over
  queries of its attention-probability column), and ≥ ``sink_lift`` × what uniform attention would give it
  (1/N; causal: the mean over queries t ≥ j of 1/(t+1)), in some block.

A non-prefix token is *massive* if it is massive in any residual state from ``from_layer`` on (the
input to block 0 is the embedding: no attention has shaped it yet), else *artifact* if it is an
artifact there, else *sink* if it is a sink in some block from ``from_layer`` on. CLS and register
tokens are always listed, under their own kind. "Stable across images" means the same position has the
same kind in at least ``stable`` of the images.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fnabench.analysis.capture import AnalysisInputError

#: kinds a listed token can have
KINDS = ("massive", "artifact", "sink", "CLS", "register")
#: token sets whose attention share is reported per layer and head
SHARE_SETS = ("detected", "massive", "artifact", "sink", "prefix", "first", "top")


@dataclass(frozen=True)
class Thresholds:
    """The detection criteria (module docstring); the defaults are the ``mask`` variant's and Sun et al.'s."""

    artifact_ratio: float = 3.0
    massive_ratio: float = 20.0
    ratios: tuple[float, ...] = (2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0)
    activation: float = 100.0
    activation_factor: float = 1000.0
    sink_share: float = 0.2
    sink_lift: float = 2.0
    from_layer: int = 1
    stable: float = 0.9

    def check(self) -> Thresholds:
        if not 1 <= self.artifact_ratio <= self.massive_ratio:
            raise AnalysisInputError(f"ratios: need 1 <= artifact ratio ({self.artifact_ratio}) <= massive ratio "
                                     f"({self.massive_ratio})")
        if not 0 < self.sink_share <= 1 or not 0 < self.stable <= 1 or self.sink_lift < 1:
            raise AnalysisInputError(f"sink share ({self.sink_share}) and stable fraction ({self.stable}) must be "
                                     f"in (0, 1], sink lift ({self.sink_lift}) >= 1")
        if self.activation <= 0 or self.activation_factor <= 0 or self.from_layer < 0:
            raise AnalysisInputError("activation threshold and factor must be > 0 and from_layer >= 0")
        return self


@dataclass
class Report:
    """The analysis of one model under one variant over I inputs; arrays are numpy, first axis the input.

    L blocks; residual index l is the stream entering block l (l = L: leaving the last block); attention
    layer l reads residual l. N tokens (the first ``num_prefix`` are CLS/registers), H heads.

    Raw: ``norms``, ``max_abs``, ``max_dim`` [I, L+1, N], ``median_abs`` [I, L+1], ``top`` [I, L+1, K, 3]
    (value, token, dimension of the K largest |activations|), ``received`` [I, L, H, N], ``masked``
    [I, L, N], ``features`` [I, D]. Derived: ``ratio``, ``massive``, ``artifact``, ``massive_activation``
    [I, L+1, N]; ``sink`` [I, L, H, N] (per head); ``kind`` [I, N] (index into :data:`KINDS`, -1: not
    listed); ``shares[name]`` [I, L, H] for each of :data:`SHARE_SETS` (``top``: each head's most attended
    token, ``top_token`` [I, L, H] says which); ``top_sink`` / ``top_share`` [I, L]: the most attended token
    averaged over heads.
    """

    model: str
    variant: str
    names: list[str]
    num_prefix: int
    prefix_kinds: list[str]
    causal: bool
    thresholds: Thresholds
    arrays: dict[str, np.ndarray]
    grid: tuple[int, int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        a, t = self.arrays, self.thresholds
        norms = a["norms"]
        count, depth1, n = norms.shape
        self.depth = depth1 - 1
        body = np.arange(n) >= self.num_prefix
        self.median_norm = np.median(norms[:, :, body], axis=-1)
        self.ratio = norms / np.maximum(self.median_norm[..., None], np.finfo(np.float32).tiny)
        self.massive_activation = (a["max_abs"] > t.activation) & (
            a["max_abs"] >= t.activation_factor * a["median_abs"][..., None])
        self.massive = body & ((self.ratio >= t.massive_ratio) | self.massive_activation)
        self.artifact = body & (self.ratio >= t.artifact_ratio) & ~self.massive
        received = a["received"]
        self.uniform = self._uniform(n)  # [N]: what uniform (causal) attention would give each token
        self.sink = (received >= t.sink_share) & (received >= t.sink_lift * self.uniform)  # [I, L, H, N]: per head
        self.top_token = received.argmax(axis=-1)  # [I, L, H]: each head's most attended token
        self.top_token_share = received.max(axis=-1)
        mean_received = received.mean(axis=2)  # [I, L, N] over heads
        self.top_sink = mean_received.argmax(axis=-1)
        self.top_share = mean_received.max(axis=-1)
        late = slice(t.from_layer, None)
        kind = np.full((count, n), -1)
        kind[self.sink[:, late].any(axis=(1, 2)) & body] = KINDS.index("sink")
        kind[self.artifact[:, late].any(axis=1)] = KINDS.index("artifact")
        kind[self.massive[:, late].any(axis=1)] = KINDS.index("massive")
        for p, name in enumerate(self.prefix_kinds):
            kind[:, p] = KINDS.index(name)
        self.kind = kind
        token_sets = {
            "detected": (kind == KINDS.index("massive")) | (kind == KINDS.index("artifact")),
            "massive": kind == KINDS.index("massive"),
            "artifact": kind == KINDS.index("artifact"),
            "sink": kind == KINDS.index("sink"),
            "prefix": np.broadcast_to(~body, (count, n)),
            "first": np.broadcast_to(np.arange(n) == 0, (count, n)),
        }
        self.shares = {name: np.einsum("ilhn,in->ilh", received, chosen.astype(received.dtype))
                       for name, chosen in token_sets.items()}
        self.shares["top"] = self.top_token_share
        self.token_sets = token_sets

    # ------------------------------------------------------------------------------------------ sizes

    @property
    def count(self) -> int:
        """Number of inputs (images or sequences)."""
        return self.arrays["norms"].shape[0]

    @property
    def tokens(self) -> int:
        return self.arrays["norms"].shape[2]

    @property
    def heads(self) -> int:
        return self.arrays["received"].shape[2]

    @property
    def late(self) -> slice:
        """Residual / attention layers the classification reads (``from_layer`` on)."""
        return slice(self.thresholds.from_layer, None)

    def position(self, token: int) -> list[int] | None:
        """[row, col] of a patch token on the image grid; None for a prefix token or without a grid."""
        if self.grid is None or token < self.num_prefix:
            return None
        return list(divmod(token - self.num_prefix, self.grid[1]))

    def _uniform(self, n: int) -> np.ndarray:
        if not self.causal:
            return np.full(n, 1.0 / n)
        return np.cumsum((1.0 / np.arange(1, n + 1))[::-1])[::-1] / n

    def uniform_share(self, token: int) -> float:
        """The share ``token`` would receive under uniform attention (causal: 1/(t+1) from each query t ≥ token)."""
        return float(self.uniform[token])

    # ------------------------------------------------------------------------------------------ listings

    def listed(self) -> list[dict[str, Any]]:
        """Every listed token of every input: its kind, where, when, how large, how much attention it draws."""
        a, late = self.arrays, self.late
        rows = []
        for i in range(self.count):
            for p in np.flatnonzero(self.kind[i] >= 0):
                ratio = self.ratio[i, late, p]
                detected_layers = np.flatnonzero((self.massive[i, :, p] | self.artifact[i, :, p])[late])
                share = a["received"][i, late, :, p].mean(axis=-1)
                best = int(np.argmax(a["max_abs"][i, late, p])) + self.thresholds.from_layer
                rows.append({
                    "input": self.names[i], "index": i, "token": int(p), "grid": self.position(int(p)),
                    "kind": KINDS[self.kind[i, p]],
                    "first_layer": (int(detected_layers[0]) + self.thresholds.from_layer
                                    if detected_layers.size else None),
                    "layers": int(detected_layers.size),
                    "max_ratio": float(ratio.max()),
                    "max_activation": float(a["max_abs"][i, best, p]), "activation_dim": int(a["max_dim"][i, best, p]),
                    "massive_activation": bool(self.massive_activation[i, late, p].any()),
                    "max_share": float(share.max()) if share.size else 0.0,
                    "max_head_share": float(a["received"][i, late, :, p].max()) if share.size else 0.0,
                    "sink_heads": int(self.sink[i, late, :, p].sum()),
                })
        return rows

    def kinds_summary(self) -> dict[str, dict[str, Any]]:
        """Per kind: in how many inputs, how many per input, where, from which block, how large, which
        dimensions, the attention share it draws, and whether its positions are stable across inputs."""
        rows = self.listed()
        out: dict[str, dict[str, Any]] = {}
        for kind in KINDS:
            mine = [r for r in rows if r["kind"] == kind]
            if not mine:
                continue
            per_input = Counter(r["index"] for r in mine)
            positions = Counter(r["token"] for r in mine)
            dims = Counter(r["activation_dim"] for r in mine if r["massive_activation"])
            stable = sorted(p for p, c in positions.items() if c >= self.thresholds.stable * self.count)
            firsts = [r["first_layer"] for r in mine if r["first_layer"] is not None]
            share = self.shares[kind if kind in self.shares else "prefix"][:, self.late].mean(axis=-1)
            out[kind] = {
                "inputs": len(per_input), "of": self.count,
                "per_input": float(sum(per_input.values()) / self.count),
                "positions": [[int(p), int(c)] for p, c in positions.most_common(8)],
                "stable_positions": [int(p) for p in stable],
                "stable": bool(stable),
                "first_layer_median": float(np.median(firsts)) if firsts else None,
                "max_ratio": float(max(r["max_ratio"] for r in mine)),
                "median_max_ratio": float(np.median([r["max_ratio"] for r in mine])),
                "max_activation": float(max(r["max_activation"] for r in mine)),
                "activation_dims": [[int(d), int(c)] for d, c in dims.most_common(5)],
                "max_share": float(max(r["max_share"] for r in mine)),
                "layer_share_max": float(share.max(axis=-1).mean()) if kind in ("massive", "artifact", "sink")
                else None,
            }
        return out

    def per_layer(self) -> list[dict[str, Any]]:
        """One row per residual state (and the block reading it): norms, ratios, counts, attention shares."""
        body = slice(self.num_prefix, None)
        rows = []
        for layer in range(self.depth + 1):
            ratio = self.ratio[:, layer, body]
            max_ratio = ratio.max(axis=-1) if ratio.size else np.zeros(self.count)
            row: dict[str, Any] = {
                "layer": layer,
                "median_norm": float(np.median(self.median_norm[:, layer])),
                "max_norm": float(self.arrays["norms"][:, layer, body].max()),
                "max_ratio_median": float(np.median(max_ratio)),
                "max_ratio": float(max_ratio.max()),
                "massive_per_input": float(self.massive[:, layer].sum(axis=-1).mean()),
                "artifact_per_input": float(self.artifact[:, layer].sum(axis=-1).mean()),
                "massive_activations_per_input": float(self.massive_activation[:, layer].sum(axis=-1).mean()),
                "max_activation": float(self.arrays["max_abs"][:, layer].max()),
                "median_abs": float(np.median(self.arrays["median_abs"][:, layer])),
            }
            for threshold in self.thresholds.ratios:
                row[f"above_{threshold:g}x"] = float((ratio >= threshold).sum(axis=-1).mean())
            for p, name in enumerate(self.prefix_kinds):
                row[f"ratio_{name}{p if name == 'register' else ''}"] = float(np.median(self.ratio[:, layer, p]))
            if not self.prefix_kinds:
                row["ratio_first"] = float(np.median(self.ratio[:, layer, 0]))
            if layer < self.depth:
                for name in SHARE_SETS:
                    row[f"share_{name}"] = float(self.shares[name][:, layer].mean())
                row["top_sink_token"] = int(Counter(self.top_sink[:, layer].tolist()).most_common(1)[0][0])
                row["top_sink_inputs"] = int(Counter(self.top_sink[:, layer].tolist()).most_common(1)[0][1])
                row["masked_per_input"] = float(self.arrays["masked"][:, layer].sum(axis=-1).mean())
            rows.append(row)
        return rows

    def head_shares(self) -> dict[str, list[list[float]]]:
        """Per token set, the [L][H] attention share averaged over inputs."""
        return {name: self.shares[name].mean(axis=0).round(6).tolist() for name in SHARE_SETS}

    def activations(self, limit: int = 200) -> list[dict[str, Any]]:
        """The scalars that meet the massive-activation criterion (largest first, at most ``limit``)."""
        a, t = self.arrays, self.thresholds
        hits = []
        top = a["top"]
        for i in range(self.count):
            for layer in range(self.depth + 1):
                floor = max(t.activation, t.activation_factor * float(a["median_abs"][i, layer]))
                for value, token, dim in top[i, layer]:
                    if np.isfinite(value) and value > floor:
                        hits.append({"input": self.names[i], "layer": layer, "token": int(token), "dim": int(dim),
                                     "value": float(value), "times_median": float(value / a["median_abs"][i, layer])})
        return sorted(hits, key=lambda h: -h["value"])[:limit]

    # ------------------------------------------------------------------------------------------ summaries

    def metrics(self) -> dict[str, float]:
        """Scalar summary (the leaderboard's columns): over inputs, from ``from_layer`` on."""
        late, body = self.late, slice(self.num_prefix, None)
        ratio = self.ratio[:, late, body]
        max_ratio = ratio.reshape(self.count, -1).max(axis=-1) if ratio.size else np.zeros(self.count)
        act = self.arrays["max_abs"][:, late].reshape(self.count, -1).max(axis=-1)
        act_ratio = (self.arrays["max_abs"][:, late] / self.arrays["median_abs"][:, late, None]).reshape(
            self.count, -1).max(axis=-1)
        patches = self.tokens - self.num_prefix
        massive = (self.kind == KINDS.index("massive")).sum(axis=-1)
        artifact = (self.kind == KINDS.index("artifact")).sum(axis=-1)
        out = {
            "norm_ratio_max": float(max_ratio.max()),
            "norm_ratio_median": float(np.median(max_ratio)),
            "massive_tokens": float(massive.mean()),
            "artifact_tokens": float(artifact.mean()),
            "artifact_percent": float(100 * artifact.mean() / max(patches, 1)),
            "activation_max": float(act.max()),
            "activation_ratio_max": float(act_ratio.max()),
            "sink_share_detected": float(self.shares["detected"][:, late].mean(axis=-1).max(axis=-1).mean()),
            "top_sink_share": float(self.top_share[:, late].max(axis=-1).mean()),
            "masked_tokens": float(self.arrays["masked"].sum(axis=-1).max(axis=-1).mean()),
        }
        # CLS and registers; a decoder's first token
        prefix = self.shares["first" if self.num_prefix == 0 else "prefix"][:, late].mean(axis=-1)
        out["prefix_share"] = float(prefix.max(axis=-1).mean())
        return out

    def verdict(self) -> list[str]:
        """Plain sentences: what this model shows, or that it shows no outliers."""
        t, m, kinds = self.thresholds, self.metrics(), self.kinds_summary()
        blocks = f"residual states {t.from_layer}–{self.depth}"
        lines = []
        if "massive" not in kinds and "artifact" not in kinds:
            lines.append(
                f"No outlier tokens: in {blocks} no {'token' if self.num_prefix == 0 else 'patch token'} reaches "
                f"{t.artifact_ratio:g}× the median norm (largest {m['norm_ratio_max']:.2f}×) and no activation is "
                f"a massive one (> {t.activation:g} and ≥ {t.activation_factor:g}× the median |x|; largest "
                f"{m['activation_max']:.1f}, {m['activation_ratio_max']:.0f}× the median).")
        for kind in ("massive", "artifact"):
            k = kinds.get(kind)
            if not k:
                continue
            where = ", ".join(f"{p} ({c}/{self.count})" for p, c in k["positions"][:4])
            dims = ", ".join(f"{d} ({c})" for d, c in k["activation_dims"][:3]) or "none > threshold"
            lines.append(
                f"{kind.capitalize()} tokens in {k['inputs']}/{self.count} inputs, {k['per_input']:.2f} per input"
                + (f" ({m['artifact_percent']:.1f} % of patches)" if kind == "artifact" else "")
                + f"; positions (inputs): {where}; {'stable' if k['stable'] else 'not stable'} across inputs; from "
                f"residual state {k['first_layer_median']:g} (median); norm up to {k['max_ratio']:.1f}× the median; "
                f"massive-activation dims (tokens): {dims}; up to {k['max_share']:.2f} of a layer's attention on one.")
        for p, name in enumerate(self.prefix_kinds or ["first token"]):
            label = f"register {p}" if name == "register" else name
            lines.append(f"{label[0].upper()}{label[1:]}: {self._token_line(p)}"
                         + (f" (uniform causal attention would give it {self.uniform_share(0):.3f})"
                            if self.causal and p == 0 else "") + ".")
        if "sink" in kinds:
            k = kinds["sink"]
            lines.append(f"Sinks without an outlier norm: {k['per_input']:.2f} per input at positions "
                         f"{', '.join(str(p) for p, _ in k['positions'][:4])}, up to {k['max_share']:.2f} of a "
                         "layer's attention.")
        return lines

    def _token_line(self, token: int) -> str:
        """Norm, attention drawn and sink heads of one position, over inputs and blocks from ``from_layer``."""
        late = self.late
        share = self.arrays["received"][:, late, :, token]
        heads = self.sink[:, late, :, token].sum(axis=(1, 2))
        total = share.shape[1] * share.shape[2]
        return (f"norm {np.median(self.ratio[:, late, token]):.2f}× the median (median over inputs and states), draws "
                f"{share.mean():.3f} of the attention on average, up to {share.mean(axis=-1).max():.3f} of a block's "
                f"and {share.max():.3f} of one head's; a sink (≥ {self.thresholds.sink_share:g} of a head) in "
                f"{np.median(heads):.0f} of {total} block-heads (median over inputs)")

    def summary(self) -> dict[str, Any]:
        """Everything but the raw arrays, JSON-ready."""
        return {"model": self.model, "variant": self.variant, "inputs": self.count, "tokens": self.tokens,
                "blocks": self.depth, "heads": self.heads, "num_prefix": self.num_prefix,
                "prefix_kinds": self.prefix_kinds, "grid": list(self.grid) if self.grid else None,
                "causal": self.causal, "thresholds": asdict(self.thresholds), "meta": self.meta,
                "verdict": self.verdict(), "metrics": self.metrics(), "kinds": self.kinds_summary(),
                "layers": self.per_layer(), "head_shares": self.head_shares(), "tokens_listed": self.listed(),
                "massive_activations": self.activations(), "names": self.names}
