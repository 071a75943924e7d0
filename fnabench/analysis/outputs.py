"""Files of an analysis: JSON of the summary, CSVs of every number, the figures.

``summary.json`` (verdict, metrics, kinds, per layer, per head, listed tokens, massive activations),
``layers.csv`` (one row per residual state), ``heads.csv`` (block, head, token set, share), ``tokens.csv``
(every listed token of every input), ``activations.csv`` (every scalar meeting the massive criterion);
with ``full``: ``token_norms.csv`` (input, state, token, norm, ratio, largest |activation| and its dim)
and ``arrays.npz`` (every array of the report). An ablation adds ``ablation-KIND-ACTION.json/.csv`` and
its figures (none when it removed nothing).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fnabench._io import write_atomic, write_text_atomic
from fnabench.analysis import figures as fig
from fnabench.analysis.report import SHARE_SETS, Report


def write_json(path: Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=1, sort_keys=False, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value).__name__}")


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Rows of dicts as CSV (columns: the union of keys in first-seen order unless given)."""
    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        columns = list(seen)

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _cell(row.get(k)) for k in columns})

    return write_atomic(path, write)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def _token_rows(report: Report) -> Iterable[dict[str, Any]]:
    a = report.arrays
    for i in range(report.count):
        for layer in range(report.depth + 1):
            for p in range(report.tokens):
                yield {"input": report.names[i], "state": layer, "token": p, "norm": float(a["norms"][i, layer, p]),
                       "ratio": float(report.ratio[i, layer, p]), "max_activation": float(a["max_abs"][i, layer, p]),
                       "dim": int(a["max_dim"][i, layer, p])}


def head_rows(report: Report) -> list[dict[str, Any]]:
    """(block, head, token set, mean share over inputs) for every set."""
    rows = []
    for name in SHARE_SETS:
        grid = report.shares[name].mean(axis=0)
        for (layer, head), value in np.ndenumerate(grid):
            rows.append({"block": layer, "head": head, "set": name, "share": float(value)})
    return rows


def write_report(report: Report, out: Path, *, full: bool = True, figures: bool = True,
                 images: list | None = None) -> list[Path]:
    """Write ``report``'s files into ``out`` (made if missing); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [
        write_json(out / "summary.json", report.summary()),
        write_csv(out / "layers.csv", report.per_layer()),
        write_csv(out / "heads.csv", head_rows(report), ["block", "head", "set", "share"]),
        write_csv(out / "tokens.csv", report.listed(),
                  ["input", "token", "grid", "kind", "first_layer", "layers", "max_ratio", "max_activation",
                   "activation_dim", "massive_activation", "max_share", "max_head_share", "sink_heads"]),
        write_csv(out / "activations.csv", report.activations(limit=100_000),
                  ["input", "layer", "token", "dim", "value", "times_median"]),
    ]
    if full:
        written.append(write_csv(out / "token_norms.csv", list(_token_rows(report)),
                                 ["input", "state", "token", "norm", "ratio", "max_activation", "dim"]))
        arrays = {**report.arrays, "ratio": report.ratio, "kind": report.kind, "top_sink": report.top_sink,
                  **{f"share_{k}": v for k, v in report.shares.items()}}
        np.savez_compressed(out / "arrays.npz", **arrays)
        written.append(out / "arrays.npz")
    if figures:
        written += [fig.norms_by_layer(report, out / "norms_by_layer.png"),
                    fig.token_norms(report, out / "token_norms.png", images),
                    fig.sink_share(report, out / "sink_share.png")]
    return written


def ablation_stem(ablation) -> str:
    return f"ablation-{ablation.kind}-{ablation.action}"


def write_ablation(ablation, out: Path, *, figures: bool = True, images: list | None = None) -> list[Path]:
    """Write an ablation's comparison (JSON, per-layer CSV) and its before/after figures into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = ablation_stem(ablation)
    written = [write_json(out / f"{stem}.json", ablation.summary()),
               write_csv(out / f"{stem}.csv", ablation.per_layer())]
    if figures and ablation.masked_layers.size:  # an ablation that removed nothing has nothing to draw

        written.append(fig.ablation(ablation, out / f"{stem}.png"))
        maps = fig.ablation_maps(ablation, out / f"{stem}-maps.png", images)
        if maps is not None:
            written.append(maps)
    return written
