"""Figures of an analysis and of an ablation (matplotlib, extra ``plot``): norm-by-layer curves, token-norm
maps over the image (or over positions, for a decoder), sink-share heatmaps (layer × head), before/after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fnabench._extras import require
from fnabench.analysis.report import Report


def _plt():
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return path


def _band(ax, x, values: np.ndarray, label: str, **style) -> None:
    """Median over inputs with the interquartile band."""
    lo, mid, hi = np.percentile(values, [25, 50, 75], axis=0)
    line, = ax.plot(x, mid, label=label, **style)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)


def norms_by_layer(report: Report, path: Path) -> Path:
    """Three panels over residual states: token norms by kind, max/median norm ratio, largest |activation|."""
    plt = _plt()
    t, a = report.thresholds, report.arrays
    x = np.arange(report.depth + 1)
    body = slice(report.num_prefix, None)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    _band(ax, x, report.median_norm, "median token" if report.causal else "median patch", color="0.3")
    _band(ax, x, a["norms"][:, :, body].max(axis=-1), "largest " + ("token" if report.causal else "patch"),
          color="tab:orange")
    for p, name in enumerate(report.prefix_kinds):
        _band(ax, x, a["norms"][:, :, p], name if name == "CLS" else f"register {p}", linestyle="--")
    if report.causal:
        _band(ax, x, a["norms"][:, :, 0], "first token", color="tab:red", linestyle="--")
    for kind, colour in (("massive", "tab:red"), ("artifact", "tab:purple")):
        chosen = report.token_sets[kind]
        if chosen.any():
            values = np.array([a["norms"][i][:, chosen[i]].mean(axis=-1) for i in range(report.count)
                               if chosen[i].any()])
            _band(ax, x, values, f"{kind} tokens (mean)", color=colour, linewidth=2)
    ax.set(yscale="log", xlabel="residual state (input of block; last = output)", ylabel="L2 norm",
           title="Residual-stream norms")
    ax.legend(fontsize=7)
    ax = axes[1]
    ratio = report.ratio[:, :, body].max(axis=-1)
    ax.plot(x, np.median(ratio, axis=0), color="tab:orange", label="max / median (median over inputs)")
    ax.fill_between(x, ratio.min(axis=0), ratio.max(axis=0), color="tab:orange", alpha=0.2, linewidth=0,
                    label="range over inputs")
    ax.axhline(t.artifact_ratio, color="tab:purple", linestyle=":", label=f"artifact {t.artifact_ratio:g}×")
    ax.axhline(t.massive_ratio, color="tab:red", linestyle=":", label=f"massive {t.massive_ratio:g}×")
    ax.set(yscale="log", xlabel="residual state", ylabel="norm / median norm", title="Largest norm ratio")
    ax.legend(fontsize=7)
    ax = axes[2]
    _band(ax, x, a["max_abs"].max(axis=-1), "largest |activation|", color="tab:green")
    _band(ax, x, a["median_abs"], "median |activation|", color="0.5")
    ax.axhline(t.activation, color="tab:red", linestyle=":", label=f"massive: > {t.activation:g}")
    ax.set(yscale="log", xlabel="residual state", ylabel="|activation|", title="Largest scalar activation")
    ax.legend(fontsize=7)
    for ax in axes:
        _integer_ticks(ax.xaxis)
    fig.suptitle(f"{report.model} — {report.count} inputs, {report.tokens} tokens")
    return _save(fig, path)


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _thumb(image: Any) -> np.ndarray | None:
    """An [H, W, 3] array in [0, 1] from a PIL image or a [3, H, W] tensor (min-max scaled)."""
    if image is None:
        return None
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB").resize((128, 128))) / 255.0
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 3:
        arr = arr.transpose(1, 2, 0)
        return (arr - arr.min()) / max(float(np.ptp(arr)), 1e-9)
    return None


def _map_layers(report: Report) -> list[int]:
    """Residual states worth mapping: the first classified one, where ratios peak, and the output."""
    body = slice(report.num_prefix, None)
    peak = int(np.argmax(report.ratio[:, report.late, body].max(axis=(0, 2)))) + report.thresholds.from_layer
    return sorted({report.thresholds.from_layer, peak, report.depth})


def token_norms(report: Report, path: Path, images: list | None = None, inputs: int = 4) -> Path:
    """Vision: the norm ratio of every patch over the image grid, for a few inputs at a few residual states,
    detected tokens outlined. Decoders: residual state × position heatmap of the median norm ratio."""
    plt = _plt()
    if report.grid is None:
        fig, ax = plt.subplots(figsize=(10, 3.6))
        im = ax.imshow(np.median(report.ratio, axis=0), aspect="auto", cmap="magma", origin="lower",
                       norm=_log_norm(report.ratio))
        ax.set(xlabel="token position", ylabel="residual state", title=f"{report.model}: norm / median norm, "
               f"median over {report.count} inputs")
        _integer_ticks(ax.yaxis)
        fig.colorbar(im, ax=ax)
        return _save(fig, path)
    layers = _map_layers(report)
    shown = list(range(min(inputs, report.count)))
    cols = len(layers) + 1
    fig, axes = plt.subplots(len(shown), cols, figsize=(2.6 * cols, 2.6 * len(shown)), squeeze=False)
    vmax = max(float(report.ratio[:, :, report.num_prefix:].max()), report.thresholds.artifact_ratio)
    im = None
    for r, i in enumerate(shown):
        thumb = _thumb(images[i]) if images is not None and i < len(images) else None
        ax = axes[r][0]
        if thumb is not None:
            ax.imshow(thumb)
        ax.set_title(report.names[i], fontsize=7)
        ax.axis("off")
        for c, layer in enumerate(layers, start=1):
            grid = report.ratio[i, layer, report.num_prefix:].reshape(report.grid)
            ax = axes[r][c]
            im = ax.imshow(grid, cmap="magma", vmin=0, vmax=vmax)
            hot = (report.massive[i, layer] | report.artifact[i, layer])[report.num_prefix:].reshape(report.grid)
            ys, xs = np.nonzero(hot)
            ax.scatter(xs, ys, s=30, facecolors="none", edgecolors="cyan", linewidths=0.8)
            ax.set_title(f"state {layer}: max {grid.max():.2f}×", fontsize=7)
            ax.axis("off")
    fig.suptitle(f"{report.model}: token norm / median norm over the image (cyan: ≥ "
                 f"{report.thresholds.artifact_ratio:g}×)", fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6)
    return _save(fig, path)


def _log_norm(values: np.ndarray):
    from matplotlib.colors import LogNorm

    positive = values[values > 0]
    return LogNorm(vmin=max(float(positive.min()), 1e-3), vmax=max(float(values.max()), 1.0 + 1e-6))


def _heatmap(ax, grid: np.ndarray, title: str, vmin=0.0, vmax=1.0, cmap="viridis"):
    im = ax.imshow(grid, aspect="auto", origin="lower", vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set(xlabel="head", ylabel="block", title=title)
    _integer_ticks(ax.xaxis)
    _integer_ticks(ax.yaxis)
    if grid.shape[0] * grid.shape[1] <= 400:
        for (layer, head), value in np.ndenumerate(grid):
            ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if value < (vmin + vmax) / 2 else "black")
    return im


def sink_sets(report: Report) -> list[tuple[str, str]]:
    """The token sets worth a heatmap: detected outliers if any, CLS/registers or the first token, the top token."""
    sets = [("detected", "massive + artifact tokens")] if report.token_sets["detected"].any() else []
    sets.append(("prefix", "CLS + registers") if report.num_prefix else ("first", "first token"))
    sets.append(("top", "the most attended token"))
    return sets


def sink_share(report: Report, path: Path) -> Path:
    """Block × head heatmaps of the attention share landing on each token set (mean over inputs)."""
    plt = _plt()
    sets = sink_sets(report)
    fig, axes = plt.subplots(1, len(sets), figsize=(4.8 * len(sets), 0.3 * report.depth + 2.5), squeeze=False,
                             gridspec_kw={"wspace": 0.35})
    im = None
    for ax, (name, title) in zip(axes[0], sets, strict=True):
        im = _heatmap(ax, report.shares[name].mean(axis=0), f"share on {title}")
    fig.suptitle(f"{report.model}: fraction of each head's attention mass (mean over queries and inputs)", fontsize=9,
                 y=1.02)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8)
    return _save(fig, path)


def ablation(ab, path: Path) -> Path:
    """Before/after: the other kind per block, the largest norm ratio, the top sink's share, and the change
    in the top sink's share per block and head."""
    plt = _plt()
    rows = ab.per_layer()
    x = [r["layer"] for r in rows]
    blocks = [r for r in rows if "masked" in r]
    other = ab.other
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    ax = axes[0]
    ax.plot(x, [r[f"{other}_before"] for r in rows], "o-", label="before")
    ax.plot(x, [r[f"{other}_after"] for r in rows], "s-", label="after")
    ax.plot(x, [r["emerged"] for r in rows], "^:", label=f"newly {other}")
    ax.set(xlabel="residual state", ylabel="tokens per input", title=f"{other} tokens")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(x, [r["max_ratio_before"] for r in rows], "o-", label="before")
    ax.plot(x, [r["max_ratio_after"] for r in rows], "s-", label="after")
    ax.axhline(ab.before.thresholds.artifact_ratio, color="tab:purple", linestyle=":")
    ax.axhline(ab.before.thresholds.massive_ratio, color="tab:red", linestyle=":")
    ax.set(yscale="log", xlabel="residual state", ylabel="max / median norm (median over inputs)",
           title="largest norm ratio")
    ax.legend(fontsize=7)
    ax = axes[2]
    bx = [r["layer"] for r in blocks]
    ax.plot(bx, [r["top_share_before"] for r in blocks], "o-", label="top sink, before")
    ax.plot(bx, [r["top_share_after"] for r in blocks], "s-", label="top sink, after")
    ax.plot(bx, [r["masked_share_before"] for r in blocks], "x:", label="removed tokens' share, before")
    ax.set(xlabel="block", ylabel="attention share (head mean)", title="attention sinks", ylim=(0, 1))
    for ax in axes[:3]:
        _integer_ticks(ax.xaxis)
    ax.legend(fontsize=7)
    delta = ab.after.shares["top"].mean(axis=0) - ab.before.shares["top"].mean(axis=0)
    bound = max(float(np.abs(delta).max()), 1e-6)
    im = _heatmap(axes[3], delta, "top sink's share: after − before", vmin=-bound, vmax=bound, cmap="coolwarm")
    fig.colorbar(im, ax=axes[3])
    fig.suptitle(f"{ab.before.model}: {ab.spec}", fontsize=9)
    return _save(fig, path)


def ablation_maps(ab, path: Path, images: list | None = None, inputs: int = 2) -> Path | None:
    """Vision: the norm-ratio map before and after the ablation at the residual state that changed most."""
    if ab.before.grid is None:
        return None
    plt = _plt()
    b, a = ab.before, ab.after
    body = slice(b.num_prefix, None)
    change = np.abs(a.ratio[:, :, body] - b.ratio[:, :, body]).max(axis=(0, 2))
    layer = int(np.argmax(change))
    shown = list(range(min(inputs, b.count)))
    fig, axes = plt.subplots(len(shown), 3, figsize=(8, 2.7 * len(shown)), squeeze=False)
    vmax = max(float(b.ratio[:, layer, body].max()), float(a.ratio[:, layer, body].max()), 1.0)
    im = None
    for r, i in enumerate(shown):
        thumb = _thumb(images[i]) if images is not None and i < len(images) else None
        if thumb is not None:
            axes[r][0].imshow(thumb)
        axes[r][0].set_title(b.names[i], fontsize=7)
        for c, (rep, label) in enumerate(((b, "before"), (a, "after")), start=1):
            grid = rep.ratio[i, layer, body].reshape(rep.grid)
            im = axes[r][c].imshow(grid, cmap="magma", vmin=0, vmax=vmax)
            axes[r][c].set_title(f"{label}: state {layer}, max {grid.max():.2f}×", fontsize=7)
        for ax in axes[r]:
            ax.axis("off")
    fig.suptitle(f"{b.model}: norm / median norm, {ab.spec}", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.6)
    return _save(fig, path)
