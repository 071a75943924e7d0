"""``fnabench status RESULTS [CONFIG]``: which cells of a sweep are done, failed, running or missing.

Read from the results folder alone: records (done, failed with their one-line errors), claim files
(running: where, and how fresh the heartbeat is; stale claims are taken over by the next runner) and
the job manifest an executor writes (where a missing cell was submitted). The grid comes from CONFIG,
else from the ``sweep.toml`` the runner saved in RESULTS; without either, missing cells are unknown.
Exit 0 when every cell it knows of is done, 1 otherwise (what it found), 2 for a bad path or config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fnabench._errors import EXIT_FOUND, EXIT_OK
from fnabench.harness import claims
from fnabench.harness import config as cfg
from fnabench.harness import records as rec
from fnabench.harness.executor import JOBS_DIR, MANIFEST
from fnabench.harness.executor_settings import parse_executor
from fnabench.harness.runner import cell_label, cells

STATES = ("done", "failed", "running", "missing")


@dataclass
class CellStatus:
    """One cell: its state and what explains it (an error, a claim's owner, a job)."""

    id: str
    state: str
    label: str
    detail: str = ""


def _record_label(r: dict) -> str:
    size = r["settings"].get("image_size")
    return f"{r['model']}{f' @{size}px' if size else ''} | {r['variant_short']} | {r['task']}"


def _submissions(results: Path) -> dict[str, str]:
    """Cell id → the job it was last submitted in (from RESULTS/.jobs/submitted.jsonl)."""
    path = results / JOBS_DIR / MANIFEST
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        for cell in entry.get("cells", []):
            out[cell] = f"{entry.get('executor', '?')} job {entry.get('job', '?')}, submitted {entry.get('submitted')}"
    return out


def collect(results: str | Path, config=None, *, stale_after: float = claims.STALE_AFTER_S) -> list[CellStatus]:
    """Every cell's state: the grid of ``config`` (a SweepConfig) if given, else the cells records or claims name."""
    results = Path(results)
    records = {r["id"]: r for r in rec.latest_by_cell(rec.read_records(results, strict=False))}
    held = claims.list_claims(results)
    queued = _submissions(results)
    if config is not None:
        grid = {c.id: cell_label(c) for c in cells(config)}
    else:
        grid = {rid: _record_label(r) for rid, r in records.items()}
        grid.update({cid: info.owner.get("label") or f"cell {cid}" for cid, info in held.items() if cid not in grid})
    out = []
    for cid, label in grid.items():
        record, claim = records.get(cid), held.get(cid)
        if record is not None and record["status"] == "ok":
            out.append(CellStatus(cid, "done", label))
        elif claim is not None:
            stale = claim.stale(stale_after)
            beat = f"heartbeat {claim.age_s:.0f} s ago"
            detail = f"{claim.where()}, {beat}" + (f"; stale ({stale}), the next run takes it over" if stale else "")
            out.append(CellStatus(cid, "running", label, detail))
        elif record is not None:
            out.append(CellStatus(cid, "failed", label, record["error"] or "failed"))
        else:
            out.append(CellStatus(cid, "missing", label, queued.get(cid, "")))
    return out


def render(results: Path, statuses: list[CellStatus], grid_known: bool, others: int = 0) -> str:
    counts = {s: sum(1 for c in statuses if c.state == s) for s in STATES}
    head = ", ".join(f"{counts[s]} {s}" for s in STATES if grid_known or s != "missing")
    lines = [f"{results}: {len(statuses)} cells: {head}"]
    if not grid_known:
        lines.append("(no sweep config here or given: cells never started are not known; pass CONFIG)")
    if others:
        lines.append(f"({others} records in the folder belong to cells outside this config's grid)")
    for state in ("failed", "running", "missing"):
        rows = [c for c in statuses if c.state == state]
        if rows:
            lines.append(f"{state}:")
            lines += [f"  {c.label}" + (f": {c.detail}" if c.detail else "") for c in rows]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("status", help="done / failed / running / missing cells of a results folder")
    p.add_argument("results", help="results folder")
    p.add_argument("config", nargs="?", help="sweep config (default: RESULTS/sweep.toml, if there)")
    p.set_defaults(func=command)


def command(args) -> int:

    results = Path(args.results)
    if not results.is_dir():
        raise rec.RecordError(f"no results at {str(results)!r}: expected a results folder that `fnabench run` wrote")
    source = args.config or (results / "sweep.toml" if (results / "sweep.toml").is_file() else None)
    config = cfg.load(source, here=False) if source else None  # a GPU sweep's status is read anywhere
    stale_after = parse_executor(config.executor).stale_after_s if config else claims.STALE_AFTER_S
    statuses = collect(results, config, stale_after=stale_after)
    others = 0
    if config is not None:
        ids = {s.id for s in statuses}
        others = sum(1 for r in rec.read_records(results, strict=False) if r["id"] not in ids)
    print(render(results, statuses, config is not None, others))
    return EXIT_OK if all(s.state == "done" for s in statuses) else EXIT_FOUND
