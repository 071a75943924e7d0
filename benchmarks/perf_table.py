"""The README's performance table, generated from benchmark CSVs (never typed by hand).

    python benchmarks/perf_table.py                 # print the table from benchmarks/results/*.csv
    python benchmarks/perf_table.py --write README.md   # replace the block between the perf-table markers

Attention rows (benchmarks/attention.py --csv) give each speed-up beside its FLOP bound; ViT rows
(benchmarks/vit.py --csv) beside the measured Amdahl bound (exact / null on the same layers).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"
ATTENTION = [("attention_cpu.csv", "idle"), ("attention_cpu_loaded.csv", "other core busy")]
VIT = ["vit_cpu.csv"]
OFFICIAL = "official_fna_cpu.csv"


def _rows(name: str) -> list[dict]:
    path = RESULTS / name
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _x(value: str) -> str:
    return f"{float(value):.2f}×" if value else "–"


def _pct(value: str) -> str:
    return f"{100 * float(value):.0f} %" if value else "–"


def render() -> str:
    """Two Markdown tables: one attention call, then whole ViTs; every number read from a CSV."""
    lines = ["| load | N | method | speed-up vs SDPA | FLOP bound | of bound |", "|---|---|---|---|---|---|"]
    for name, load in ATTENTION:
        for r in _rows(name):
            if r["method"] == "exact" or r.get("skipped"):
                continue
            lines.append(f"| {load} | {r['n']} | `{r['method']}` | {_x(r['speedup'])} | {_x(r['flop_bound'])} "
                         f"| {_pct(r['of_bound'])} |")
    lines += ["", "| model | px (tokens) | method | GFLOPs per batch | speed-up | Amdahl bound | of bound |",
              "|---|---|---|---|---|---|---|"]
    for name in VIT:
        for r in _rows(name):
            if r["method"] in ("exact", "unpatched") or r["method"].startswith("null"):
                continue
            lines.append(f"| {r['model']} | {r['size']} ({r['tokens']}) | `{r['method']}` | {float(r['gflops']):.1f} "
                         f"| {_x(r['speedup'])} | {_x(r['amdahl'])} | {_pct(r['of_amdahl'])} |")
    official = [r for r in _rows(OFFICIAL) if r["impl"] != "exact (SDPA)" and not r.get("skipped")]
    if official:
        lines += ["", "FNA beside the official code (its formula, torch-quickfps landmarks; "
                  f"benchmarks/official_fna.py), m = {official[0]['m']}, same process and inputs, load average "
                  "before each cell in the CSV:", "",
                  "| N | threads | implementation | speed-up vs SDPA | FLOP bound | vs official | selection share |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['n']} | {r['threads']} | {r['impl']} | {_x(r['speedup'])} | {_x(r['flop_bound'])} "
                  f"| {_x(r['vs_official'])} | {_pct(r['select_share'])} |" for r in official]
    first = next((r for n in [a for a, _ in ATTENTION] + VIT for r in _rows(n)), None)
    where = f"{first['device_name']}, {first['threads']} threads, {first['dtype']}" if first else "no CSV found"
    return "\n".join([f"Measured on: {where} (CSVs in `benchmarks/results/`).", "", *lines])


def replace_block(text: str, table: str) -> str:
    """``text`` with the block between the markers replaced by ``table``."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"perf_table: no {BEGIN} … {END} block to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write", metavar="README", help="replace the marked block in this file")
    args = p.parse_args(argv)
    table = render()
    if args.write:
        path = Path(args.write)
        path.write_text(replace_block(path.read_text(), table))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
