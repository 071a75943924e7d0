"""Accuracy-vs-GFLOPs plots of a leaderboard's tables (matplotlib, extra ``plot``): one panel per task, the
Pareto front drawn, coincident points labelled once."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fnabench._extras import require
from fnabench.harness.leaderboard import GFLOPS_HEADER, Table, build_tables


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "task"


def _coincident(pts: list[tuple[float, float, str]], tol: float = 0.005) -> list[tuple[float, float, list[str]]]:
    """Group points that would be drawn on top of each other (within ``tol`` of each axis' span), so they
    share one label, e.g. ``exact = mask:tokens=all`` when masking changed nothing."""
    xspan = (max(p[0] for p in pts) - min(p[0] for p in pts)) or 1.0
    yspan = (max(p[1] for p in pts) - min(p[1] for p in pts)) or 1.0
    groups: list[tuple[float, float, list[str]]] = []
    for x, y, name in pts:
        for gx, gy, names in groups:
            if abs(x - gx) <= tol * xspan and abs(y - gy) <= tol * yspan:
                names.append(name)
                break
        else:
            groups.append((x, y, [name]))
    return groups


def _draw(ax: Any, table: Table) -> bool:
    """Draw one task's accuracy-vs-GFLOPs panel; False when nothing had both numbers."""
    markers = "osD^vP*Xhp<>"
    series: dict[str, list[tuple[float, float, str]]] = {}
    for v in table.values:
        y = v["metrics"].get(table.primary) if table.primary else None
        if v["status"] == "ok" and v["gflops"] is not None and y is not None:
            series.setdefault(v["model"], []).append((v["gflops"], float(y), v["variant"]))
    if not series:
        ax.text(0.5, 0.5, "no records with GFLOPs and a primary metric", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_title(table.task)
        return False
    for i, (model, pts) in enumerate(series.items()):
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.scatter(xs, ys, marker=markers[i % len(markers)], label=model, zorder=3)
        for x, y, names in _coincident(pts):
            ax.annotate(" = ".join(names), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    xs = [p[0] for pts in series.values() for p in pts]
    span = max(xs) - min(xs) or max(xs) or 1.0
    ax.set_xlim(min(xs) - 0.05 * span, max(xs) + 0.6 * span)  # room for the labels of the costliest points
    front = sorted(((v["gflops"], float(v["metrics"][table.primary])) for v in table.values if v["pareto"]),
                   key=lambda p: (p[0], -p[1] if table.higher_is_better else p[1]))
    if front:
        fx, fy = [p[0] for p in front], [p[1] for p in front]
        ax.step(fx, fy, where="post", color="0.4", linestyle="--", linewidth=1, label="Pareto front", zorder=2)
    ax.set_xlabel(GFLOPS_HEADER.replace("GFLOPs", "GFLOPs per forward"))
    ax.set_ylabel(f"{table.primary} ({'higher' if table.higher_is_better else 'lower'} is better)")
    ax.set_title(table.task)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return True


def _save(fig: Any, stem: Path) -> list[Path]:
    import matplotlib

    paths = []
    with matplotlib.rc_context({"svg.hashsalt": "fnabench", "svg.fonttype": "path"}):
        for ext, meta in (("png", {"Software": None}), ("svg", {"Date": None, "Creator": None})):
            path = stem.with_name(stem.name + f".{ext}")
            fig.savefig(path, format=ext, metadata=meta, dpi=150 if ext == "png" else None, bbox_inches="tight")
            paths.append(path)
    return paths


def plot(records: Iterable[dict], out_stem: str | Path) -> list[Path]:
    """Write accuracy(primary)-vs-GFLOPs PNG and SVG: ``STEM.png/.svg`` with one panel per task, and
    ``STEM-<task>.png/.svg`` per task when there are several; one marker per model, variants labelled,
    the Pareto front as a step line. Needs matplotlib (Agg, no pyplot state touched)."""
    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tables = build_tables(records)
    stem = Path(out_stem)
    if stem.suffix.lower() in (".png", ".svg"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    n = max(len(tables), 1)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(6.4 * cols, 4.8 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, table in zip(axes, tables, strict=False):
        _draw(ax, table)
    for ax in axes[len(tables):]:
        ax.set_axis_off()
    if not tables:
        axes[0].text(0.5, 0.5, "no records", ha="center", va="center")
    paths += _save(fig, stem)
    if len(tables) > 1:
        for table in tables:
            fig = Figure(figsize=(6.4, 4.8))
            FigureCanvasAgg(fig)
            _draw(fig.subplots(), table)
            paths += _save(fig, stem.with_name(f"{stem.name}-{_slug(table.task)}"))
    return paths
