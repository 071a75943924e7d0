"""Markdown tables: per-run emergence points with their spread, and the OOD-probe table."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from .config import to_toml

#: the files :func:`report_files` makes beside a leaderboard's table (``dynamics.png`` needs the run directories)
REPORT_FILES = ("emergence.md", "ood.md", "preset.toml")

PROBE_TITLES = {
    "none": "recall query (in distribution)",
    "misdirected": "misdirected label (another system's label, needle's payload)",
    "sync": "synchronized observation (all systems pass through the resumed state)",
    "unseen_label": "unseen label (needle's payload)",
    "unseen_system": "unseen label and unseen system",
}


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def emergence_table(runs: Sequence[tuple[str, dict, dict]]) -> str:
    """Rows (label, eval summary, costs): when k=1 and k=2 emerge (examples, GFLOPs), their ratio, final errors,
    then a spread row over runs (min / median / max)."""
    header = ["run", "params", "k=2 emerges (examples)", "k=2 (train GFLOPs)", "k=1 emerges (examples)",
              "k=1 (train GFLOPs)", "k=1 ÷ k=2", "final k=1 err", "final k=2 err", "zero pred.",
              "examples trained", "train time (s)"]
    rows, k1s, k2s, ratios = [], [], [], []
    for label, summary, costs in runs:
        e1, e2 = summary["emergence"]["1"], summary["emergence"]["2"]
        ratio = e1["examples"] / e2["examples"] if e1["examples"] and e2["examples"] else None
        k1s.append(e1["examples"])
        k2s.append(e2["examples"])
        ratios.append(ratio)
        rows.append([
            label, f"{costs.get('parameters', 0):,}", _point(e2), _num(_g(e2["flops"])),
            _point(e1), _num(_g(e1["flops"])), _num(ratio, 2),
            _num(summary["model"]["final"]["1"]["median"][-1]), _num(summary["model"]["final"]["2"]["median"][-1]),
            _num(summary["zero"]["final"]["1"]["median"]), f"{summary['examples'][-1]:,}",
            f"{summary['seconds'][-1]:.0f}",
        ])
    if len(runs) > 1:
        rows.append(["**spread** (min / median / max)", "", _spread(k2s, count=True), "", _spread(k1s, count=True),
                     "", _spread(ratios), "", "", "", "", ""])
    note = ("Emergence: the first checkpoint whose median error (over examples, of the median over traces) at k "
            "observations after the query's open label is below half the zero predictor's (in brackets: the "
            "checkpoint from which it stays below). GFLOPs count forward + backward of every training step "
            "(2 × multiply-adds).\n\n")
    return note + _table(header, rows)


def _g(flops: int | None) -> float | None:
    return None if flops is None else flops / 1e9


def _point(e: dict) -> str:
    """First crossing, and (when later) where the curve stays below for good."""
    text = _count(e["examples"])
    if e["examples"] is not None and e["stable_examples"] not in (None, e["examples"]):
        text += f" (stays below from {_count(e['stable_examples'])})"
    return text


def _count(value: int | None) -> str:
    return "never" if value is None else f"{int(value):,}"


def _spread(values: Sequence[float | None], count: bool = False) -> str:
    known = [v for v in values if v is not None]
    missing = len(values) - len(known)
    if not known:
        return "never"
    text = " / ".join(_count(v) if count else _num(v) for v in (min(known), statistics.median(known), max(known)))
    return text + (f" ({missing} never)" if missing else "")


def ood_table(runs: Sequence[tuple[str, dict[str, dict]]], ks: Sequence[str] | None = None) -> str:
    """Rows = probes; per k the median over runs of each run's median error [min–max over runs], with the
    zero and least-squares (system known) references at the same k."""
    probes = list(runs[0][1])
    first = next(s for s in runs[0][1].values() if "model" in s)
    ks = [k for k in (ks or first["model"]["final"]) if k in first["model"]["final"]]
    header = ["probe"] + [f"k={k} model" for k in ks] + [f"k={k} zero / LS" for k in ks[:2]]
    rows = []
    for probe in probes:
        summaries = [r[1][probe] for r in runs]
        if any("model" not in s for s in summaries):
            rows.append([PROBE_TITLES.get(probe, probe)] + ["skipped"] * (len(header) - 1))
            continue
        row = [PROBE_TITLES.get(probe, probe)]
        for k in ks:
            values = [s["model"]["final"][k]["median"][-1] for s in summaries]
            cell = _num(statistics.median(values))
            if len(values) > 1:
                cell += f" [{_num(min(values))}–{_num(max(values))}]"
            row.append(cell)
        for k in ks[:2]:
            row.append(f"{_num(summaries[0]['zero']['final'][k]['median'])} / "
                       f"{_num(summaries[0]['ls']['final'][k]['median'])}")
        rows.append(row)
    step = first["steps"][-1]
    note = (f"Median squared error k observations after the query's open label at the last checkpoint "
            f"(step {step}); median over {len(runs)} run(s) [min–max]. LS = in-context least squares told which "
            "system the payload belongs to.\n\n")
    return note + _table(header, rows)


def report_files(runs: Sequence[dict]) -> dict[str, str]:
    """``emergence.md``, ``ood.md`` and ``preset.toml`` (the first run's config, every run's seed) of runs as
    :func:`fnabench.tasks.recall.records.runs_from_records` gives them."""
    seeds = ", ".join(str(run["config"].train.seed) for run in runs)
    first = runs[0]["config"]
    return {
        "emergence.md": emergence_table([(run["label"], run["summary"], run["costs"]) for run in runs]),
        "ood.md": ood_table([(run["label"], run["probes"]) for run in runs]),
        "preset.toml": to_toml(first, f"recall preset {first.preset!r}; seeds {seeds}"),
    }
