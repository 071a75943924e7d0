"""How cells are compared, for every reader of records (runner, leaderboard, gate, tune, publish, testing): the
exact reference of a cell, its speed-up (paired rounds), the binomial standard error of a share, the Pareto front."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

#: the canonical reference variant; any "exact:..." variant without "+" also counts as exact
EXACT_REFERENCE = "exact:impl=sdpa"


#: settings a variant must share with its exact reference (everything in a cell's identity but the variant)
_MATCH_SETTINGS = ("image_size", "dtype", "device", "batch_size", "limit", "seed")


def is_exact(variant: str) -> bool:
    """Whether a canonical variant string is exact attention (``exact`` or ``exact:...`` without ``+``)."""
    return variant == "exact" or (variant.startswith("exact:") and "+" not in variant)


def pareto_front(points: Sequence[tuple[float, float] | None], higher_is_better: bool = True) -> list[bool]:
    """Which (cost, score) points no other point dominates (cost no higher and score no worse, one strictly).

    ``None`` points (no cost or no score) are never on the front. Identical points are all on it.
    """
    sign = 1.0 if higher_is_better else -1.0
    pts = [None if p is None else (float(p[0]), sign * float(p[1])) for p in points]
    out = []
    for i, p in enumerate(pts):
        if p is None or not all(math.isfinite(x) for x in p):
            out.append(False)
            continue
        dominated = any(
            q is not None and j != i and all(math.isfinite(x) for x in q)
            and q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1])
            for j, q in enumerate(pts)
        )
        out.append(not dominated)
    return out


def _image_size(rec: dict) -> Any:
    """The configured image size, else the size the model ran at (the runner records both)."""
    return rec["settings"].get("image_size") or rec.get("image_size")


def reference_key(rec: dict) -> tuple:
    """What a variant shares with its exact reference: model, task and every identity setting."""
    return (rec["model"], rec["task"], *(repr(rec["settings"].get(k)) for k in _MATCH_SETTINGS))


def exact_references(recs: Iterable[dict]) -> dict[tuple, dict]:
    """The ok exact record per :func:`reference_key`: ``exact:impl=sdpa`` when there, else the first exact by name."""
    refs: dict[tuple, dict] = {}
    for r in sorted(recs, key=lambda r: (r["variant"] != EXACT_REFERENCE, r["variant"])):
        if r["status"] == "ok" and is_exact(r["variant"]):
            refs.setdefault(reference_key(r), r)
    return refs


def _median(rec: dict) -> float | None:
    timing = rec.get("timing")
    if rec["status"] != "ok" or not timing:
        return None
    median = timing.get("median_s")
    return float(median) if isinstance(median, (int, float)) and median > 0 else None


def paired_speedup(timing: dict) -> float | None:
    """The median over timing rounds of exact's latency / the variant's latency in the same round.

    Each round times the two back to back on the same batch, so a round's ratio is immune to load
    drifting between rounds; the median of those ratios keeps that pairing, which a ratio of the two
    medians would throw away. None when the timing has no paired rounds.
    """
    rounds = [r for r in timing.get("speedup_rounds") or [] if isinstance(r, (int, float)) and r > 0]
    return float(statistics.median(rounds)) if rounds else None


def speedup(rec: dict, ref: dict | None) -> float | None:
    """Exact latency / this cell's latency, or None when unmeasured.

    The runner times each cell interleaved with exact attention on the same batch: the median of the
    paired per-round ratios is used when the record has them (:func:`paired_speedup`), else the ratio
    it stored (``timing.speedup``, older records: exact's median / the variant's median), else the
    ratio of the two records' medians.
    """
    timing = (rec.get("timing") or {}) if rec.get("status") == "ok" else {}
    paired = paired_speedup(timing) or timing.get("speedup")
    if isinstance(paired, (int, float)) and paired > 0:
        return float(paired)
    if ref is None:
        return None
    a, b = _median(ref), _median(rec)
    return None if a is None or b is None else a / b


def standard_error(rec: dict, metric: str | None) -> float | None:
    """Binomial standard error √(p(1−p)/n) of a metric that is a share of the record's items, in its own units."""
    over = (rec.get("proportions") or {}).get(metric) if metric else None
    value = rec["metrics"].get(metric) if metric else None
    n = (rec.get("items") or {}).get(over[0]) if over else None
    if not over or value is None or not n:
        return None
    p = min(max(float(value) / over[1], 0.0), 1.0)
    return over[1] * math.sqrt(p * (1 - p) / n)
