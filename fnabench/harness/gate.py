"""Regression gates: a baseline made from one run, and a check of a new run against it.

A baseline stores, per cell, each metric with its value, absolute tolerance and direction, the
counted FLOPs, and the cell's speed ratio against ``exact`` measured in the same run (absolute times
are too noisy on shared machines to gate on), with the spread of that ratio over its timing rounds.
:func:`check` fails when a metric moves in its bad direction past its tolerance, counted FLOPs change
past a relative tolerance, a speed ratio falls past what both the tolerance and the two runs' measured
noise allow, or a baseline cell is missing, failed, or lacks a number it had.

Speed is judged like with like: a ratio that fell but was timed on another CPU, or while other
processes kept the machine busy in one run and not the other, is reported as not judged instead of
failing. So an identical rerun does not fail, and a real slow-down larger than the noise still does.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

from fnabench._errors import UserError
from fnabench.harness.compare import exact_references, reference_key, speedup
from fnabench.harness.leaderboard import fmt_number
from fnabench.harness.records import latest_by_cell, write_text_atomic

BASELINE_FORMAT = 2
_READS_FORMATS = (1, 2)  # format 1 had no timing spread: its speed ratios are judged by the tolerance alone
_FORMAT_KEY = "fnabench_baseline"
#: how many standard errors of the difference of two log speed ratios count as noise
NOISE_Z = 3.0
#: a run whose timing had other processes keep this many more CPU cores busy than the other run is not comparable
BUSY_CORES = 0.5


class BaselineError(UserError, ValueError):
    """A baseline file or object that cannot be used (one-line message)."""


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_tolerance(name: str, value: Any) -> float:
    if not _finite(value) or value < 0:
        raise BaselineError(f"tolerance for {name} must be a non-negative number, got {value!r}")
    return float(value)


def _median_noise(rounds: int) -> float:
    """How much noisier a median of ``rounds`` values is than their mean (√(π/2) for normal data; equal up to 2)."""
    return 1.2533 if rounds >= 3 else 1.0


@dataclass(frozen=True)
class SpeedSample:
    """A cell's speed-up vs exact as one run measured it: the ratio, its spread over rounds, and the conditions."""

    ratio: float
    log_sd: float | None  # standard deviation of log(per-round paired ratio); None with < 2 paired rounds
    rounds: int
    others_busy: float | None  # CPU cores other processes kept busy while it was timed
    device_name: str | None

    def standard_error(self, pooled_sd: float | None) -> float | None:
        """Standard error of the log ratio: the larger of the cell's own and the run's pooled spread, over √rounds.

        The pooled spread guards against two rounds that happened to agree.
        """
        sds = [sd for sd in (self.log_sd, pooled_sd) if sd is not None]
        if not sds or self.rounds < 1:
            return None
        return max(sds) * _median_noise(self.rounds) / math.sqrt(self.rounds)


def speed_sample(rec: Mapping[str, Any], ref: Mapping[str, Any] | None) -> SpeedSample | None:
    """The :class:`SpeedSample` of an ok record (``ref``: its exact reference), None when it was not timed."""
    ratio = speedup(rec, ref)
    if ratio is None:
        return None
    timing = rec.get("timing") or {}
    rounds = [r for r in timing.get("speedup_rounds") or [] if _finite(r) and r > 0]
    log_sd = statistics.stdev(math.log(r) for r in rounds) if len(rounds) >= 2 else None
    busy = timing.get("others_busy_cores")
    return SpeedSample(ratio, log_sd, len(rounds) or int(timing.get("repeats") or 1),
                       float(busy) if _finite(busy) else None, (rec.get("environment") or {}).get("device_name"))


def pooled_log_sd(samples: Iterable[SpeedSample | None]) -> float | None:
    """The run's typical spread of a log speed ratio: root mean square of the cells' own spreads."""
    sds = [s.log_sd for s in samples if s is not None and s.log_sd is not None]
    return math.sqrt(sum(sd * sd for sd in sds) / len(sds)) if sds else None


def _rounds_needed(se: float, rounds: int, z: float, tolerance_log: float, most: int = 1000) -> int:
    """The fewest timing rounds whose noise (z·√2 standard errors, same spread) fits inside the tolerance."""
    spread = se * math.sqrt(rounds) / _median_noise(rounds)
    for n in range(rounds, most):
        if z * math.sqrt(2) * spread * _median_noise(n) / math.sqrt(n) <= tolerance_log:
            return n
    return most


def _tolerance_log(speed_tolerance: float) -> float:
    return math.inf if speed_tolerance >= 1 else -math.log1p(-speed_tolerance)


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
    samples: list[SpeedSample | None] = []
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
        sample = speed_sample(r, ref) if ref is not r else None
        samples.append(sample)
        cells[r["id"]] = {
            "model": r["model"], "variant": r["variant"], "variant_short": r["variant_short"], "task": r["task"],
            "settings": {k: r["settings"][k] for k in sorted(r["settings"])},
            "metrics": metrics,
            "flops": flops.get("total"),
            "gflops": flops["total"] / 1e9 if isinstance(flops.get("total"), int) else None,
            "speed_ratio": sample.ratio if sample else None,
            "speed": None if sample is None else {"log_sd": sample.log_sd, "rounds": sample.rounds,
                                                  "others_busy_cores": sample.others_busy,
                                                  "device_name": sample.device_name},
        }
    return {_FORMAT_KEY: BASELINE_FORMAT, "default_tolerance": default_tolerance,
            "speed_tolerance": speed_tolerance, "flops_tolerance": flops_tolerance,
            "speed_noise": {"pooled_log_sd": pooled_log_sd(samples), "z": NOISE_Z, "busy_cores": BUSY_CORES},
            "tolerances": dict(sorted(tolerances.items())), "cells": cells, "excluded": excluded}


def _baseline_sample(cell: Mapping[str, Any]) -> SpeedSample | None:
    speed = cell.get("speed") or {}
    if cell.get("speed_ratio") is None:
        return None
    return SpeedSample(float(cell["speed_ratio"]), speed.get("log_sd"), int(speed.get("rounds") or 1),
                       speed.get("others_busy_cores"), speed.get("device_name"))


def tolerance_warnings(baseline: Mapping[str, Any]) -> list[str]:
    """What the run a baseline was made from cannot support: speed cells whose own timing noise is larger
    than the speed tolerance (they will be judged against the noise), and timing under load."""
    tol = float(baseline["speed_tolerance"])
    noise = baseline.get("speed_noise") or {}
    pooled, z = noise.get("pooled_log_sd"), float(noise.get("z", NOISE_Z))
    samples = [s for s in map(_baseline_sample, baseline["cells"].values()) if s is not None]
    out = []
    loose = []
    for s in samples:
        se = s.standard_error(pooled)
        if se is not None and z * math.sqrt(2) * se > _tolerance_log(tol):
            loose.append((z * math.sqrt(2) * se, s.rounds, _rounds_needed(se, s.rounds, z, _tolerance_log(tol))))
    if loose:
        worst, rounds, _ = max(loose)
        need = max(n for _, _, n in loose)
        out.append(f"{len(loose)} of {len(samples)} speed-up cell(s) were timed too noisily for the speed tolerance "
                   f"{tol:.0%}: an identical rerun can move them by up to {math.expm1(worst):.0%} ({z:g}σ over "
                   f"{rounds} round(s)), so check will judge them against that noise instead; for the tolerance "
                   f"to hold, run the sweep with --timing-repeats {need} or more")
    busy = [s.others_busy for s in samples if s.others_busy is not None and s.others_busy > BUSY_CORES]
    if busy:
        out.append(f"{len(busy)} speed-up cell(s) were timed while other processes kept up to {max(busy):.1f} CPU "
                   "core(s) busy; a check on a quiet machine will not judge them: make the baseline on a quiet one")
    return out


def _validate_baseline(obj: Any, source: str) -> dict[str, Any]:
    def bad(why: str) -> BaselineError:
        return BaselineError(f"{source}: not a usable fnabench baseline ({why})")

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}")
    if obj.get(_FORMAT_KEY) not in _READS_FORMATS:
        raise bad(f"{_FORMAT_KEY!r} must be one of {', '.join(map(str, _READS_FORMATS))}; "
                  "make one with `fnabench baseline RESULTS -o FILE`")
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
        speed = cell.get("speed")
        if speed is not None and (not isinstance(speed, dict) or any(
                speed.get(k) is not None and not _finite(speed[k]) for k in ("log_sd", "rounds", "others_busy_cores"))):
            raise bad(f"cell {cid} 'speed' must be an object with numeric log_sd, rounds, others_busy_cores")
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
    not_judged: list[str] = field(default_factory=list)  # speed-ups that fell but whose timings are not comparable

    @property
    def ok(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.ok

    def render(self, fmt: str = "github") -> str:
        """A summary line, then (when something moved) a table: cell, what, baseline, now, allowed; then the
        speed-ups left unjudged, one line each with the reason."""
        notes = "".join(f"- {line}\n" for line in self.not_judged)
        if notes:
            notes = f"\n{len(self.not_judged)} speed-up(s) fell but were not judged (timings not comparable):\n{notes}"
        if self.ok:
            line = f"OK: {self.checked} baseline cell(s) checked, nothing moved past its tolerance"
            new = f" ({len(self.new_cells)} new cell(s) not in the baseline)" if self.new_cells else ""
            return f"{line}{new}\n{notes}"
        rows = [[p.cell, p.what, p.baseline, p.now, p.allowed] for p in self.problems]
        tablefmt = "pipe" if fmt in ("github", "markdown") else fmt
        table = tabulate(rows, headers=["cell", "what", "baseline", "now", "allowed"], tablefmt=tablefmt,
                         disable_numparse=True)
        return f"FAILED: {len(self.problems)} problem(s) in {self.checked} baseline cell(s)\n\n{table}\n{notes}"


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
    noise = baseline.get("speed_noise") or {}
    base_pooled, z = noise.get("pooled_log_sd"), float(noise.get("z", NOISE_Z))
    now_pooled = pooled_log_sd(speed_sample(r, refs.get(reference_key(r))) for r in latest
                               if r["status"] == "ok" and refs.get(reference_key(r)) is not r)
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
        base = _baseline_sample(cell)
        if base is not None:
            ref = refs.get(reference_key(rec))
            now = speed_sample(rec, ref) if ref is not rec else None
            judged = _speed_problem(base, now, speed_tol, base_pooled, now_pooled, z)
            if isinstance(judged, str):
                report.not_judged.append(f"{label}: {judged}")
            elif judged is not None:
                add("speed-up vs exact", f"{base.ratio:.2f}×", *judged)
    return report


def _speed_problem(base: SpeedSample, now: SpeedSample | None, tol: float, base_pooled: float | None,
                   now_pooled: float | None, z: float) -> tuple[str, str] | str | None:
    """(now, allowed) when the speed-up fell past both the tolerance and the noise; None when it holds; a reason
    string when it fell but the two timings are not comparable (another CPU, or a loaded machine in one run)."""
    if now is None:
        return "not measured", f"≥ {base.ratio * (1 - tol):.2f}× (−{tol:.0%})"
    ses = [se for se in (base.standard_error(base_pooled), now.standard_error(now_pooled)) if se is not None]
    noise = z * math.sqrt(sum(se * se for se in ses)) if len(ses) == 2 else 0.0
    allowed = max(_tolerance_log(tol), noise)
    floor = base.ratio * math.exp(-allowed)
    if now.ratio >= floor * (1 - 1e-9):
        return None
    moved = f"{now.ratio:.2f}× vs {base.ratio:.2f}×, below the {floor:.2f}× allowed"
    if base.device_name and now.device_name and base.device_name != now.device_name:
        return f"speed-up not judged ({moved}): timed on {now.device_name!r}, the baseline on {base.device_name!r}"
    if base.others_busy is not None and now.others_busy is not None \
            and abs(now.others_busy - base.others_busy) > BUSY_CORES:
        return (f"speed-up not judged ({moved}): other processes kept {now.others_busy:.1f} CPU core(s) busy "
                f"while it was timed, {base.others_busy:.1f} in the baseline")
    why = f"timing noise, {z:g}σ" if noise > _tolerance_log(tol) else "tolerance"
    return (f"{now.ratio:.2f}× ({now.ratio / base.ratio - 1:+.0%})",
            f"≥ {floor:.2f}× (−{-math.expm1(-allowed):.0%}, {why})")
