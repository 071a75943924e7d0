"""Regression gates: a baseline made from one run, and a check of a new run against it.

A baseline stores, per cell, each metric with its value, absolute tolerance and direction, the
counted FLOPs, and the cell's speed ratio against ``exact`` measured in the same run (absolute times
are too noisy on shared machines to gate on). :func:`check` fails when a metric moves in its bad
direction past its tolerance, counted FLOPs change past a relative tolerance, a speed ratio falls
past its relative tolerance, or a baseline cell is missing, failed, or lacks a number it had.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

from .leaderboard import exact_references, fmt_number, reference_key, speedup
from .records import latest_by_cell, write_text_atomic

BASELINE_FORMAT = 1
_FORMAT_KEY = "fnabench_baseline"


class BaselineError(ValueError):
    """A baseline file or object that cannot be used (one-line message)."""


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_tolerance(name: str, value: Any) -> float:
    if not _finite(value) or value < 0:
        raise BaselineError(f"tolerance for {name} must be a non-negative number, got {value!r}")
    return float(value)


def make_baseline(records: Iterable[dict], *, tolerances: Mapping[str, float] | None = None,
                  default_tolerance: float = 0.01, speed_tolerance: float = 0.25,
                  flops_tolerance: float = 0.001) -> dict[str, Any]:
    """A JSON-serialisable baseline from a run's records (latest per cell; failed cells are listed, not gated).

    ``tolerances`` maps metric name → absolute tolerance (``default_tolerance`` for the rest);
    ``speed_tolerance`` and ``flops_tolerance`` are relative.
    """
    latest = sorted(latest_by_cell(records), key=lambda r: r["id"])
    if not latest:
        raise BaselineError("no records to make a baseline from")
    default_tolerance = _check_tolerance("default", default_tolerance)
    speed_tolerance = _check_tolerance("speed", speed_tolerance)
    flops_tolerance = _check_tolerance("flops", flops_tolerance)
    tolerances = {str(k): _check_tolerance(f"metric {k!r}", v) for k, v in (tolerances or {}).items()}
    known = {m for r in latest for m in r["metrics"]}
    unknown = sorted(set(tolerances) - known)
    if unknown:
        raise BaselineError(f"tolerance given for unknown metric(s) {', '.join(map(repr, unknown))}; "
                            f"metrics in these records: {', '.join(sorted(known)) or 'none'}")
    refs = exact_references(latest)
    cells: dict[str, Any] = {}
    excluded: dict[str, str] = {}
    for r in latest:
        if r["status"] != "ok":
            excluded[r["id"]] = f"{r['model']} {r['variant_short']} on {r['task']}: failed"
            continue
        metrics = {}
        for name, value in sorted(r["metrics"].items()):
            hib = r["higher_is_better"].get(name)
            metrics[name] = {"value": float(value) if _finite(value) else None,
                             "tolerance": tolerances.get(name, default_tolerance),
                             "higher_is_better": None if hib is None else bool(hib)}
        flops = r.get("flops") or {}
        ref = refs.get(reference_key(r))
        ratio = speedup(r, ref) if ref is not r else None
        cells[r["id"]] = {
            "model": r["model"], "variant": r["variant"], "variant_short": r["variant_short"], "task": r["task"],
            "settings": {k: r["settings"][k] for k in sorted(r["settings"])},
            "metrics": metrics,
            "flops": flops.get("total"),
            "gflops": flops["total"] / 1e9 if isinstance(flops.get("total"), int) else None,
            "speed_ratio": ratio,
        }
    return {_FORMAT_KEY: BASELINE_FORMAT, "default_tolerance": default_tolerance,
            "speed_tolerance": speed_tolerance, "flops_tolerance": flops_tolerance,
            "tolerances": dict(sorted(tolerances.items())), "cells": cells, "excluded": excluded}


def _validate_baseline(obj: Any, source: str) -> dict[str, Any]:
    def bad(why: str) -> BaselineError:
        return BaselineError(f"{source}: not a usable fnabench baseline ({why})")

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}")
    if obj.get(_FORMAT_KEY) != BASELINE_FORMAT:
        raise bad(f"{_FORMAT_KEY!r} must be {BASELINE_FORMAT}; make one with `fnabench baseline RESULTS -o FILE`")
    for key in ("speed_tolerance", "flops_tolerance"):
        if not _finite(obj.get(key)) or obj[key] < 0:
            raise bad(f"{key!r} must be a non-negative number")
    cells = obj.get("cells")
    if not isinstance(cells, dict):
        raise bad("'cells' must be an object of cell id → cell")
    for cid, cell in cells.items():
        if not isinstance(cell, dict):
            raise bad(f"cell {cid} is not an object")
        for key in ("model", "variant", "task"):
            if not isinstance(cell.get(key), str):
                raise bad(f"cell {cid} has no {key!r} string")
        if not isinstance(cell.get("metrics"), dict):
            raise bad(f"cell {cid} has no 'metrics' object")
        for name, m in cell["metrics"].items():
            if not isinstance(m, dict) or not (m.get("value") is None or _finite(m.get("value"))) \
                    or not _finite(m.get("tolerance")) or m["tolerance"] < 0 \
                    or m.get("higher_is_better") not in (True, False, None):
                raise bad(f"cell {cid} metric {name!r} needs value (number), tolerance (>= 0), higher_is_better")
        if cell.get("flops") is not None and (not isinstance(cell["flops"], int) or isinstance(cell["flops"], bool)):
            raise bad(f"cell {cid} 'flops' must be an integer or null")
        if cell.get("speed_ratio") is not None and not _finite(cell["speed_ratio"]):
            raise bad(f"cell {cid} 'speed_ratio' must be a number or null")
    return obj


def load_baseline(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a baseline JSON file; a :class:`BaselineError` with one line when it is unusable."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise BaselineError(f"no baseline at {path}; make one with `fnabench baseline RESULTS -o {path}`") from None
    except OSError as err:
        raise BaselineError(f"{path}: cannot read baseline ({err.strerror})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise BaselineError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    return _validate_baseline(obj, str(path))


def save_baseline(obj: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write a baseline as stable, indented JSON atomically (temp file + rename); returns the path."""
    obj = _validate_baseline(dict(obj), "baseline")
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False))


@dataclass(frozen=True)
class Problem:
    """One thing that moved: the cell, what, the baseline value, the value now, and what was allowed."""

    cell: str
    what: str
    baseline: str
    now: str
    allowed: str
    cell_id: str = ""


@dataclass
class CheckReport:
    """The result of :func:`check`: ``ok`` and the problems found (empty when ok)."""

    problems: list[Problem] = field(default_factory=list)
    checked: int = 0
    new_cells: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.ok

    def render(self, fmt: str = "github") -> str:
        """A summary line, then (when something moved) a table: cell, what, baseline, now, allowed."""
        if self.ok:
            line = f"OK: {self.checked} baseline cell(s) checked, nothing moved past its tolerance"
            return line + (f" ({len(self.new_cells)} new cell(s) not in the baseline)\n" if self.new_cells else "\n")
        rows = [[p.cell, p.what, p.baseline, p.now, p.allowed] for p in self.problems]
        tablefmt = "pipe" if fmt in ("github", "markdown") else fmt
        table = tabulate(rows, headers=["cell", "what", "baseline", "now", "allowed"], tablefmt=tablefmt,
                         disable_numparse=True)
        return (f"FAILED: {len(self.problems)} problem(s) in {self.checked} baseline cell(s)\n\n{table}\n")


def _cell_label(cell: Mapping[str, Any]) -> str:
    size = (cell.get("settings") or {}).get("image_size")
    px = f" @{size}px" if size is not None else ""
    return f"{cell['model']}{px} {cell.get('variant_short') or cell['variant']} on {cell['task']}"


def _metric_problem(name: str, spec: Mapping[str, Any], now: Any) -> tuple[str, str] | None:
    """(now, allowed) when ``now`` breaks the metric's tolerance in its bad direction, else None."""
    base, tol, hib = spec.get("value"), float(spec["tolerance"]), spec.get("higher_is_better")
    if base is None:  # the baseline itself was not a finite number: nothing to hold the new value to
        return None
    if not _finite(now):
        return ("missing" if now is None else str(now)), _allowed(base, tol, hib)
    drop = {True: base - now, False: now - base, None: abs(now - base)}[hib]
    if drop > tol * (1 + 1e-9) + 1e-12:
        return fmt_number(now), _allowed(base, tol, hib)
    return None


def _allowed(base: float, tol: float, hib: bool | None) -> str:
    if hib is True:
        return f"≥ {fmt_number(base - tol)} (−{fmt_number(tol)})"
    if hib is False:
        return f"≤ {fmt_number(base + tol)} (+{fmt_number(tol)})"
    return f"within ±{fmt_number(tol)}"


def check(records: Iterable[dict], baseline: Mapping[str, Any]) -> CheckReport:
    """Compare a run's records with a baseline; see the module docstring for what fails."""
    baseline = _validate_baseline(dict(baseline), "baseline")
    latest = latest_by_cell(records)
    by_id = {r["id"]: r for r in latest}
    refs = exact_references(latest)
    speed_tol = float(baseline["speed_tolerance"])
    flops_tol = float(baseline["flops_tolerance"])
    report = CheckReport(checked=len(baseline["cells"]),
                         new_cells=sorted(cid for cid in by_id if cid not in baseline["cells"]))

    for cid, cell in sorted(baseline["cells"].items(), key=lambda kv: (_cell_label(kv[1]), kv[0])):
        label = _cell_label(cell)

        def add(what: str, base: str, now: str, allowed: str, cid: str = cid, label: str = label) -> None:
            report.problems.append(Problem(label, what, base, now, allowed, cid))

        rec = by_id.get(cid)
        if rec is None:
            add("cell", "present", "missing", "present")
            continue
        if rec["status"] != "ok":
            err = (rec.get("error") or "").strip().splitlines()
            add("cell", "ok", "failed: " + (err[0][:80] if err else "unknown error"), "ok")
            continue
        for name, spec in sorted(cell["metrics"].items()):
            moved = _metric_problem(name, spec, rec["metrics"].get(name))
            if moved:
                add(f"metric {name}", fmt_number(spec["value"]), *moved)
        base_flops = cell.get("flops")
        if base_flops is not None:
            now_flops = (rec.get("flops") or {}).get("total")
            allowed = f"±{flops_tol:.2%}"
            if now_flops is None:
                add("GFLOPs", fmt_number(base_flops / 1e9), "missing", allowed)
            elif (abs(now_flops - base_flops) > flops_tol * abs(base_flops)) if base_flops else now_flops != 0:
                change = f" ({(now_flops - base_flops) / base_flops:+.2%})" if base_flops else ""
                add("GFLOPs", fmt_number(base_flops / 1e9), fmt_number(now_flops / 1e9) + change, allowed)
        base_ratio = cell.get("speed_ratio")
        if base_ratio is not None:
            ref = refs.get(reference_key(rec))
            ratio = speedup(rec, ref) if ref is not rec else None
            floor = base_ratio * (1 - speed_tol)
            allowed = f"≥ {floor:.2f}× (−{speed_tol:.0%})"
            if ratio is None:
                add("speed-up vs exact", f"{base_ratio:.2f}×", "not measured", allowed)
            elif ratio < floor * (1 - 1e-9):
                add("speed-up vs exact", f"{base_ratio:.2f}×", f"{ratio:.2f}× ({ratio / base_ratio - 1:+.0%})",
                    allowed)
    return report
