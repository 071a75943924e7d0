"""Publish a results folder as a leaderboard folder: README table, plot, sweep config and the records.

The folder is regenerated, never hand-edited: the same records and config give a byte-identical
README (dates come from the records, not from the clock), and stale generated files are removed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .config import tomllib
from .leaderboard import EXACT_REFERENCE, build_tables, plot, render
from .records import RecordError, latest_by_cell, output_path, require_records, write_record

PLOT_STEM = "plot"
_LEGEND = ("GFLOPs are counted FLOPs of one forward pass at the record's input shape (1 FLOP = one multiply or add, "
           "so GFLOPs = 2 × multiply-accumulates / 1e9). Δ and speed-up compare with `exact` attention on the same "
           "model and settings (speed-up: {timing}); ★ marks the "
           "accuracy-vs-GFLOPs Pareto front of each task.")
_PAIRED = "exact median latency / variant median latency, the two timed in alternating rounds on the same batch"
_PAIRED_ROUNDS = ("the median over rounds of exact's latency / the variant's in the same round, the two timed in "
                  "alternating rounds on the same batch")
_UNPAIRED = "exact median latency / variant median latency, each timed in its own cell"


def _timing_note(records: list[dict]) -> str:
    """How the speed-ups were timed: paired with exact in alternating rounds (the runner), or not (older records)."""
    timed = [r for r in records if r["status"] == "ok" and r.get("timing") and r["variant"] != EXACT_REFERENCE]
    if timed and all(r["timing"].get("speedup_rounds") for r in timed):
        return _PAIRED_ROUNDS
    return _PAIRED if timed and all("reference" in r["timing"] for r in timed) else _UNPAIRED


def _values(records: list[dict], get) -> list[str]:
    out = set()
    for r in records:
        try:
            value = get(r)
        except (KeyError, TypeError, AttributeError):
            value = None
        if value not in (None, ""):
            out.add(str(value))
    return sorted(out)


def _retime_devices(records: list[dict]) -> list[str]:
    return _values(records, lambda r: "{device_name} ({git_revision})".format(**r["timing"]["retimed"]["environment"]))


def _environment_lines(records: list[dict]) -> list[str]:
    fields = [
        ("device", lambda r: r["environment"].get("device_name") or r["environment"].get("device")),
        ("torch", lambda r: r["environment"]["versions"]["torch"]),
        ("fnabench", lambda r: r["environment"]["versions"]["fnabench"]),
        ("git revision", lambda r: r["environment"]["git_revision"]),
        ("python", lambda r: r["environment"]["python"]),
    ]
    lines = []
    for name, get in fields:
        values = _values(records, get)
        lines.append(f"- {name}: {', '.join(f'`{v}`' for v in values) if values else 'not recorded'}")
    return lines


def _description(config_file: Path) -> str:
    """The sweep config's ``description`` (Markdown), or "" when it has none or does not parse."""
    try:
        value = tomllib.loads(config_file.read_text()).get("description", "")
    except (OSError, tomllib.TOMLDecodeError):
        return ""
    return value.strip() if isinstance(value, str) else ""


def publish(results_dir: str | os.PathLike, dest_dir: str | os.PathLike, *,
            config_path: str | os.PathLike | None = None, command: str | None = None) -> Path:
    """Write ``dest_dir``/README.md, plot.png/.svg, config.toml and records/ from ``results_dir``; returns dest."""
    results_dir = Path(results_dir)
    records = sorted(latest_by_cell(require_records(results_dir)), key=lambda r: r["id"])
    config = Path(config_path) if config_path is not None else results_dir / "sweep.toml"
    if config_path is not None and not config.is_file():
        raise RecordError(f"sweep config {str(config)!r} not found; accepted: an existing TOML file")
    dest = output_path(dest_dir, "leaderboard folder", folder=True)

    # records/: the latest record of every cell, in the canonical on-disk form; stale ones removed
    rec_dir = dest / "records"
    rec_dir.mkdir(exist_ok=True)
    keep = {f"{r['id']}.json" for r in records}
    for stale in rec_dir.glob("*.json"):
        if stale.name not in keep:
            stale.unlink()
    for r in records:
        write_record(rec_dir, r)

    # config.toml: the given sweep config, else RESULTS/sweep.toml
    target = dest / "config.toml"
    has_config = config.is_file()
    if has_config:
        if not target.exists() or target.read_bytes() != config.read_bytes():
            shutil.copyfile(config, target)
    else:
        target.unlink(missing_ok=True)

    # plot.png / plot.svg (matplotlib optional)
    for old in list(dest.glob(f"{PLOT_STEM}.*")) + list(dest.glob(f"{PLOT_STEM}-*.*")):
        if old.suffix in (".png", ".svg"):
            old.unlink()
    try:
        plot_paths = plot(records, dest / PLOT_STEM)
        plot_note = None
    except ImportError as err:
        plot_paths, plot_note = [], f"Plot skipped: {str(err).splitlines()[0]}"

    tables = build_tables(records)
    failed = sum(1 for r in records if r["status"] != "ok")
    finished = max(r["finished"] for r in records)
    started = min(r["started"] for r in records)
    lines = [f"# Leaderboard: {dest.resolve().name}", ""]
    description = _description(target) if has_config else ""
    if description:
        lines += [description, ""]
    legend = _LEGEND.format(timing=_timing_note(records))
    lines.append(f"{len(records)} cells ({failed} failed) over {len(tables)} task(s). {legend}")
    lines.append("")
    if plot_paths:
        lines += [f"![accuracy vs GFLOPs]({PLOT_STEM}.png)", ""]
    elif plot_note:
        lines += [f"_{plot_note}_", ""]
    lines.append(render(records, "github").rstrip("\n"))
    lines += ["", "## How it was made", ""]
    if command:
        lines.append(f"- command: `{command}`")
    lines.append(f"- runs: {started} to {finished} (from the records' start and finish times)")
    lines += _environment_lines(records)
    retimed = sorted(r["timing"]["retimed"]["at"] for r in records
                     if r["status"] == "ok" and isinstance((r.get("timing") or {}).get("retimed"), dict))
    if retimed:
        lines.append(f"- latency of {len(retimed)} cells re-measured with `fnabench run --retime`: {retimed[0]} to "
                     f"{retimed[-1]}, on {', '.join(f'`{v}`' for v in _retime_devices(records))}")
    lines.append("- sweep config: [config.toml](config.toml)" if has_config else "- sweep config: not available")
    lines.append(f"- records: [records/](records/) ({len(records)} JSON files, one per cell)")
    lines += ["", "Regenerate this folder with `fnabench publish RESULTS DEST`; do not edit it by hand.", ""]
    text = "\n".join(lines)
    readme = dest / "README.md"
    if not readme.exists() or readme.read_text() != text:
        tmp = readme.with_name(".README.md.tmp")
        tmp.write_text(text)
        os.replace(tmp, readme)
    return dest
