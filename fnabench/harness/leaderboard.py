"""Leaderboards: records aggregated into accuracy-vs-GFLOPs tables (markdown, LaTeX, HTML, CSV) and plots.

One table per task; one row per model × variant cell (the latest record of each cell). Each row shows
the task's metrics (primary first), counted GFLOPs (2 × multiply-adds), attention GFLOPs, the change
of the primary metric against the ``exact`` row of the same model and settings, the speed-up against
exact (exact median latency / variant median latency, timed in alternating rounds on the same batch
when the record carries that pairing), images/s, and a ★ on rows
on the task's accuracy-vs-GFLOPs Pareto front. Failed cells stay in the table with their error.
Under each table, notes say how many test items stand behind its numbers (with the binomial standard
error where the primary metric is a proportion, also a column), how the rows are ordered, and what
the Pareto mark is taken over.
"""

from __future__ import annotations

import csv
import io
import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

from fnabench._errors import UserError
from fnabench._extras import require
from fnabench.harness.records import latest_by_cell
from fnabench.variants import SpecError, parse_variant

#: the canonical reference variant; any "exact:..." variant without "+" also counts as exact
EXACT_REFERENCE = "exact:impl=sdpa"
PARETO_MARK = "★"
MISSING = "—"
FORMATS = ("github", "markdown", "latex", "html", "csv")
GFLOPS_HEADER = "GFLOPs (2×MAC)"
ATTN_GFLOPS_HEADER = "attn GFLOPs (2×MAC)"
SPEEDUP_HEADER = "speed-up vs exact"
IMAGES_HEADER = "images/s"
PARETO_HEADER = "Pareto"
KV_HEADER = "KV cache % of full"
DECODE_HEADER = "decode-step GFLOPs"
DECODE_RATE_HEADER = "decode tokens/s"
#: settings that, when they differ between rows of one task, are added to the model label
_LABEL_SETTINGS = ("dtype", "device", "batch_size", "limit", "seed")
#: settings a variant must share with its exact reference (everything in a cell's identity but the variant)
_MATCH_SETTINGS = ("image_size", "dtype", "device", "batch_size", "limit", "seed")
_ERROR_WIDTH = 100


def is_exact(variant: str) -> bool:
    """Whether a canonical variant string is exact attention (``exact`` or ``exact:...`` without ``+``)."""
    return variant == "exact" or (variant.startswith("exact:") and "+" not in variant)


def fmt_number(value: float | None, digits: int = 4, sign: bool = False) -> str:
    """A number with ``digits`` significant digits (integers kept whole from 10**digits up); ``—`` if missing."""
    if value is None:
        return MISSING
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "+0" if sign else "0"
    plus = "+" if sign else ""
    if abs(value) >= 10**digits:
        return f"{value:{plus}.0f}"
    return f"{value:{plus}.{digits}g}"


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


@dataclass
class Table:
    """One task's leaderboard: display rows (strings) plus raw values and per-row flags."""

    task: str
    primary: str | None
    higher_is_better: bool
    metrics: list[str]
    headers: list[str]
    rows: list[list[str]]
    pareto: list[bool] = field(default_factory=list)
    failed: list[bool] = field(default_factory=list)
    exact: list[bool] = field(default_factory=list)
    #: per row: raw numbers and identity (model, image_size, variant, metric values, gflops, delta, speedup, ...)
    values: list[dict[str, Any]] = field(default_factory=list)
    #: sentences printed under the table: items behind the numbers, row order, what the Pareto mark spans
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        """The heading line: task, primary metric and its direction."""
        if self.primary is None:
            return f"{self.task} (no metrics)"
        direction = "higher is better" if self.higher_is_better else "lower is better"
        return f"{self.task} — primary metric: {self.primary} ({direction})"


def _image_size(rec: dict) -> Any:
    """The configured image size, else the size the model ran at (the runner records both)."""
    return rec["settings"].get("image_size") or rec.get("image_size")


def reference_key(rec: dict) -> tuple:
    """What a variant shares with its exact reference: model, task and every identity setting."""
    return (rec["model"], rec["task"], *(repr(rec["settings"].get(k)) for k in _MATCH_SETTINGS))


def _first_line(text: str | None) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else "unknown error"
    return line if len(line) <= _ERROR_WIDTH else line[: _ERROR_WIDTH - 1] + "…"


def _primary_of(recs: list[dict]) -> tuple[str | None, bool]:
    names = Counter(r["primary_metric"] for r in recs if r["primary_metric"] and r["status"] == "ok")
    names = names or Counter(r["primary_metric"] for r in recs if r["primary_metric"])
    if names:
        primary = sorted(names.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    else:
        metric_names = sorted({m for r in recs for m in r["metrics"]})
        primary = metric_names[0] if metric_names else None
    higher = True
    for r in recs:
        if primary in r["higher_is_better"]:
            higher = bool(r["higher_is_better"][primary])
            break
    return primary, higher


def _directions(recs: list[dict]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for r in recs:
        for k, v in r["higher_is_better"].items():
            out.setdefault(k, bool(v))
    return out


def _label(rec: dict, varying: Sequence[str]) -> str:
    label = rec["model"]
    size = _image_size(rec)
    if size is not None:
        label += f" @{size}px"
    extra = [f"{k}={rec['settings'].get(k)}" for k in varying]
    if extra:
        label += f" ({', '.join(extra)})"
    return label


def exact_references(recs: Iterable[dict]) -> dict[tuple, dict]:
    """The ok exact record per :func:`reference_key`: ``exact:impl=sdpa`` when there, else the first exact by name."""
    refs: dict[tuple, dict] = {}
    for r in sorted(recs, key=lambda r: (r["variant"] != EXACT_REFERENCE, r["variant"])):
        if r["status"] == "ok" and is_exact(r["variant"]):
            refs.setdefault(reference_key(r), r)
    return refs


def _gflops(rec: dict, key: str = "total") -> float | None:
    flops = rec.get("flops")
    if rec["status"] != "ok" or not flops or flops.get(key) is None:
        return None
    return flops[key] / 1e9


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


def _count_range(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:,}" if lo == hi else f"{lo:,}–{hi:,}"


def _items_note(recs: list[dict], primary: str | None, se_column: str | None) -> str:
    """How many items stand behind the table's numbers, per row, and what the s.e. column is."""
    ok = [r for r in recs if r["status"] == "ok"]
    counted = [r["items"] for r in ok if r.get("items")]
    if not counted:
        return "Items per row: not recorded in these records (written before fnabench recorded them)."
    keys = sorted({k for items in counted for k in items}, key=lambda k: (k != "test", k))
    parts = [f"{_count_range([c[k] for c in counted if k in c])} {k}" for k in keys]
    missing = len(ok) - len(counted)
    text = f"Items per row: {', '.join(parts)}" + (f" ({missing} row(s) did not record them)" if missing else "") + "."
    if se_column:
        text += (f" `{se_column}` is the binomial standard error of {primary}, √(p(1−p)/n) in its own units: how "
                 "far it would move on another test sample of that size (rows share their test items, so a Δ "
                 "between rows is less noisy than that).")
    return text


_ORDER_NOTE = ("Rows: grouped by the model label (model, image size, any setting that differs); in each group "
               "exact first, then the other variants from most to fewest GFLOPs; failed cells at the end of their "
               "group.")


def _pareto_note(primary: str | None, rows: int) -> str:
    if primary is None or not rows:
        return ""
    return (f"{PARETO_MARK}: on the Pareto front of {primary} vs GFLOPs taken over all {rows} ok row(s) of this table "
            f"(every model and image size together): no other row has no more GFLOPs and a {primary} at least as "
            "good, one of the two strictly.")


def _build_table(task: str, recs: list[dict], metrics_filter: set[str] | None) -> Table:
    primary, higher = _primary_of(recs)
    directions = _directions(recs)
    names = sorted({m for r in recs for m in r["metrics"]} - {primary})
    if metrics_filter is not None:
        names = [m for m in names if m in metrics_filter]
    metrics = ([primary] if primary else []) + names
    varying = [k for k in _LABEL_SETTINGS if len({repr(r["settings"].get(k)) for r in recs}) > 1]
    refs = exact_references(recs)

    def order(r: dict) -> tuple:
        g = _gflops(r)
        size = _image_size(r)
        return (r["model"], size if isinstance(size, (int, float)) else math.inf, _label(r, varying),
                not is_exact(r["variant"]), r["status"] != "ok", -g if g is not None else math.inf, r["variant"])

    recs = sorted(recs, key=order)
    points = []
    for r in recs:
        g, v = _gflops(r), r["metrics"].get(primary) if primary else None
        points.append(None if r["status"] != "ok" or g is None or v is None else (g, v))
    front = pareto_front(points, higher)
    any_failed = any(r["status"] != "ok" for r in recs)

    def arrow(m: str) -> str:
        return "" if m not in directions else (" ↑" if directions[m] else " ↓")

    has_se = any(standard_error(r, primary) is not None for r in recs if r["status"] == "ok")
    se_header = f"{primary} s.e." if has_se else None
    metric_headers = [m + arrow(m) for m in metrics]
    if se_header:
        metric_headers.insert(1, se_header)
    pers = {(r.get("flops") or {}).get("per", "image") for r in recs if r["status"] == "ok"}
    rate = IMAGES_HEADER if pers <= {"image"} else f"{pers.pop()}s/s" if len(pers) == 1 else "items/s"
    has_kv = any(r.get("kv_cache") for r in recs if r["status"] == "ok")  # decoders: what decoding keeps
    has_rate = any((r.get("kv_cache") or {}).get("decode_tokens_per_s") for r in recs if r["status"] == "ok")
    kv_headers = [KV_HEADER, DECODE_HEADER, *([DECODE_RATE_HEADER] if has_rate else [])] if has_kv else []
    headers = ["model", "variant", *metric_headers, GFLOPS_HEADER, ATTN_GFLOPS_HEADER, *kv_headers,
               f"Δ {primary} vs exact" if primary else "Δ vs exact", SPEEDUP_HEADER, rate, PARETO_HEADER]
    if any_failed:
        headers.append("error")
    table = Table(task=task, primary=primary, higher_is_better=higher, metrics=metrics, headers=headers, rows=[])
    ok_rows = sum(r["status"] == "ok" for r in recs)
    table.notes = [n for n in (_items_note(recs, primary, se_header), _ORDER_NOTE, _pareto_note(primary, ok_rows)) if n]
    for r, on_front in zip(recs, front, strict=True):
        ok = r["status"] == "ok"
        ref = refs.get(reference_key(r))
        exact_row = ref is r
        value = r["metrics"].get(primary) if primary and ok else None
        ref_value = ref["metrics"].get(primary) if ref is not None and primary else None
        delta = value - ref_value if ok and value is not None and ref_value is not None else None
        spd = speedup(r, ref) if ok else None
        timing = r.get("timing") or {}
        ips = timing.get("images_per_s") if ok else None
        raw = {
            "model": _label(r, varying), "model_name": r["model"], "image_size": _image_size(r),
            "variant": display_variant(r), "variant_spec": r["variant"], "status": r["status"], "id": r["id"],
            "metrics": {m: r["metrics"].get(m) for m in metrics} if ok else {},
            "gflops": _gflops(r), "attention_gflops": _gflops(r, "attention"), "delta": delta, "speedup": spd,
            "images_per_s": ips, "median_s": _median(r), "pareto": on_front, "exact": exact_row,
            "error": None if ok else _first_line(r["error"]),
            "items": dict(r.get("items") or {}) if ok else {}, "se": standard_error(r, primary) if ok else None,
            **_kv_values(r if ok else {}),
        }
        if ok:
            cells = [fmt_number(raw["metrics"][m]) for m in metrics]
            if se_header:
                cells.insert(1, fmt_number(raw["se"]))
            cells += [fmt_number(raw["gflops"]), fmt_number(raw["attention_gflops"])]
            if has_kv:
                cells += [fmt_number(raw["kv_percent"]), fmt_number(raw["decode_gflops"])]
                cells += [fmt_number(raw["decode_tokens_per_s"])] if has_rate else []
            cells += ["ref" if exact_row else fmt_number(delta, sign=True),
                      "ref" if exact_row else _speedup_cell(spd, timing),
                      fmt_number(ips), PARETO_MARK if on_front else ""]
        else:
            cells = ["failed", *([""] * (len(metrics) - 1 + bool(se_header)))] if metrics else []
            cells += [""] * (6 + len(kv_headers))
        row = [raw["model"], raw["variant"], *cells]
        if any_failed:
            row.append("" if ok else raw["error"])
        table.rows.append(row)
        table.pareto.append(on_front)
        table.failed.append(not ok)
        table.exact.append(exact_row)
        table.values.append(raw)
    if not metrics:  # every cell failed and none reported metrics: keep the "failed" marker visible
        table.headers.insert(2, "status")
        for row, failed in zip(table.rows, table.failed, strict=True):
            row.insert(2, "failed" if failed else "ok")
    return table


def _speedup_cell(spd: float | None, timing: dict) -> str:
    """The speed-up with the range of its paired rounds beside it, e.g. ``1.30× (1.21–1.38)``."""
    if spd is None:
        return MISSING
    rounds = [x for x in timing.get("speedup_rounds") or [] if isinstance(x, (int, float))]
    return f"{spd:.2f}× ({min(rounds):.2f}–{max(rounds):.2f})" if len(rounds) > 1 else f"{spd:.2f}×"


def display_variant(rec: dict) -> str:
    """A record's variant as tables name it under today's defaults (so a short name never means two
    computations when a default changes); the stored ``variant_short`` if the spec no longer parses."""
    try:
        return parse_variant(rec["variant"]).label(causal="causal" in rec)
    except SpecError:
        return rec["variant_short"]


def _kv_values(rec: dict) -> dict:
    """A decoder record's KV cache after prefill (bytes, % of the full cache) and decode-step FLOPs."""
    kv = rec.get("kv_cache") or {}
    full = kv.get("full_bytes")
    return {"kv_cache_bytes": kv.get("bytes"), "kv_percent": 100 * kv["bytes"] / full if full else None,
            "decode_gflops": kv.get("decode_gflops"), "decode_tokens_per_s": kv.get("decode_tokens_per_s")}


def build_tables(records: Iterable[dict], *, metrics: Iterable[str] | None = None) -> list[Table]:
    """One :class:`Table` per task (sorted by task name) from the latest record of every cell.

    ``metrics`` limits the secondary metric columns to those names (the primary metric is always shown).
    """
    latest = latest_by_cell(records)
    by_task: dict[str, list[dict]] = {}
    for r in latest:
        by_task.setdefault(r["task"], []).append(r)
    wanted = set(metrics) if metrics is not None else None
    if wanted is not None:
        known = {m for r in latest for m in r["metrics"]}
        unknown = sorted(wanted - known)
        if unknown and known:  # (when no record has metrics, e.g. all failed, the table shows the failures)
            raise UserError(f"table metric(s) {', '.join(map(repr, unknown))} in no record; accepted: "
                            f"{', '.join(sorted(known)) or 'none (no record has metrics)'}")
    return [_build_table(task, by_task[task], wanted) for task in sorted(by_task)]


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_UNICODE = {"×": r"$\times$", "★": r"$\star$", "Δ": r"$\Delta$", "↑": r"$\uparrow$", "↓": r"$\downarrow$",
                  "—": "--", "…": r"\ldots{}"}


def _latex(text: str) -> str:
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    for k, v in _LATEX_UNICODE.items():
        out = out.replace(k, v)
    return out


def _colalign(table: Table) -> tuple[str, ...]:
    text_cols = {"model", "variant", "error", "status"}
    return tuple("left" if h in text_cols else ("center" if h == PARETO_HEADER else "right") for h in table.headers)


def _csv(tables: list[Table]) -> str:
    metric_cols: list[str] = []
    for t in tables:
        metric_cols += [m for m in t.metrics if m not in metric_cols]
    headers = ["task", "primary_metric", "higher_is_better", "model", "image_size", "variant", "variant_spec",
               "status", *metric_cols, "primary_se", "n_test", "gflops", "attention_gflops", "delta_primary_vs_exact",
               "speedup_vs_exact", "images_per_s", "median_s", "pareto", "error"]
    has_kv = any(v.get("kv_cache_bytes") is not None for t in tables for v in t.values)
    has_rate = any(v.get("decode_tokens_per_s") is not None for t in tables for v in t.values)
    if has_kv:
        at = headers.index("delta_primary_vs_exact")
        headers[at:at] = ["kv_cache_bytes", "kv_cache_percent", "decode_gflops",
                          *(["decode_tokens_per_s"] if has_rate else [])]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(headers)

    def cell(v: Any) -> Any:
        if isinstance(v, float) and math.isfinite(v):
            return float(f"{v:.12g}")  # drop float noise such as 0.1 - 0.09 = 0.010000000000000009
        return "" if v is None else v

    for t in tables:
        for v in t.values:
            writer.writerow([t.task, cell(t.primary), t.higher_is_better, v["model_name"], cell(v["image_size"]),
                             v["variant"], v["variant_spec"], v["status"],
                             *(cell(v["metrics"].get(m)) for m in metric_cols), cell(v["se"]),
                             cell(v["items"].get("test")), cell(v["gflops"]), cell(v["attention_gflops"]),
                             *((cell(v["kv_cache_bytes"]), cell(v["kv_percent"]), cell(v["decode_gflops"]))
                               if has_kv else ()),
                             *((cell(v["decode_tokens_per_s"]),) if has_kv and has_rate else ()),
                             cell(v["delta"]), cell(v["speedup"]), cell(v["images_per_s"]),
                             cell(v["median_s"]), v["pareto"], cell(v["error"])])
    return buf.getvalue()


def render_table(table: Table, fmt: str = "github") -> str:
    """One table with its heading line, in ``fmt`` (github/markdown, latex, html; csv has no headings)."""
    fmt = _check_format(fmt)
    if fmt == "csv":
        return _csv([table])
    if fmt in ("github", "markdown"):
        rows = [[c.replace("|", "\\|") for c in row] for row in table.rows]
        body = tabulate(rows, headers=table.headers, tablefmt="pipe", disable_numparse=True,
                        colalign=_colalign(table))
        notes = "".join(f"\n{note}\n" for note in table.notes)
        return f"### {table.title}\n\n{body}\n{notes}"
    if fmt == "latex":
        rows = [[_latex(c) for c in row] for row in table.rows]
        body = tabulate(rows, headers=[_latex(h) for h in table.headers], tablefmt="latex_raw",
                        disable_numparse=True, colalign=_colalign(table))
        notes = "".join(f"\n{_latex(note.replace('`', ''))}\n" for note in table.notes)
        return f"\\subsection*{{{_latex(table.title)}}}\n{body}\n{notes}"
    body = tabulate(table.rows, headers=table.headers, tablefmt="html", disable_numparse=True,
                    colalign=_colalign(table))
    notes = "".join(f"<p>{_html(note.replace('`', ''))}</p>\n" for note in table.notes)
    return f"<h3>{_html(table.title)}</h3>\n{body}\n{notes}"


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class FormatError(UserError, ValueError):
    """An output format no renderer has."""


def _check_format(fmt: str) -> str:
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise FormatError(f"unknown leaderboard format {fmt!r}; accepted: {', '.join(FORMATS)}")
    return fmt


def render(records: Iterable[dict], fmt: str = "github", *, metrics: Iterable[str] | None = None) -> str:
    """All task tables in ``fmt``, each under a heading naming the task and its metric's direction.

    ``csv`` is one table for all tasks (task, primary metric and direction are columns) so it parses as CSV.
    """
    fmt = _check_format(fmt)
    tables = build_tables(records, metrics=metrics)
    if fmt == "csv":
        return _csv(tables)
    if not tables:
        return "(no records)\n"
    return "\n".join(render_table(t, fmt) for t in tables)


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
