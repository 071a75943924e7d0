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
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tabulate import tabulate

from fnabench._errors import UserError
from fnabench.harness.compare import (
    _image_size,
    _median,
    exact_references,
    is_exact,
    pareto_front,
    reference_key,
    speedup,
    standard_error,
)
from fnabench.harness.records import latest_by_cell
from fnabench.variants import SpecError, parse_variant

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
_ERROR_WIDTH = 100




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




def _gflops(rec: dict, key: str = "total") -> float | None:
    flops = rec.get("flops")
    if rec["status"] != "ok" or not flops or flops.get(key) is None:
        return None
    return flops[key] / 1e9










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










