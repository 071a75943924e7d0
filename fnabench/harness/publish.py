"""Publish a results folder as a leaderboard folder: README table, plot, sweep config and the records.

The folder is regenerated, never hand-edited: the same records and config give a byte-identical
README (dates come from the records, not from the clock), and stale generated files are removed.
Two things in it are not publish's own and are kept: a hand-written ``description.md`` (shown under the
title, after the sweep config's ``description``), and files a task suite wrote beside the table (the recall
suite's emergence and OOD tables, for one), which the README lists.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fnabench._io import write_text_atomic
from fnabench.harness.compare import EXACT_REFERENCE
from fnabench.harness.config import tomllib
from fnabench.harness.leaderboard import build_tables, render
from fnabench.harness.leaderboard_plot import plot
from fnabench.harness.records import RecordError, latest_by_cell, output_path, require_records, write_record

PLOT_STEM = "plot"
DESCRIPTION = "description.md"
#: names publish writes (plots aside); any other visible file in the folder is another tool's, and is listed
_OWN_FILES = ("README.md", "config.toml", DESCRIPTION, "records")
_LEGEND = ("GFLOPs are counted FLOPs of one forward pass at the record's input shape (1 FLOP = one multiply or add, "
           "so GFLOPs = 2 × multiply-accumulates / 1e9). Δ and speed-up compare with `exact` attention on the same "
           "model and settings (speed-up: {timing}); ★ marks the "
           "accuracy-vs-GFLOPs Pareto front of each task.")
_PAIRED = "exact median latency / variant median latency, the two timed in alternating rounds on the same batch"
_PAIRED_ROUNDS = ("the median over rounds of exact's latency / the variant's in the same round, the two timed in "
                  "alternating rounds on the same batch; in brackets the lowest and highest round")
_UNPAIRED = "exact median latency / variant median latency, each timed in its own cell"
_UNTIMED = "not measured, no record carries timing"
_FLAT_PLOT = ("Plot skipped: every row of each task has the same GFLOPs, so there is no accuracy-vs-GFLOPs "
              "trade-off to draw")


def _timing_note(records: list[dict]) -> str:
    """How the speed-ups were timed: paired with exact in alternating rounds (the runner), or not (older records)."""
    if not any(r["status"] == "ok" and r.get("timing") for r in records):
        return _UNTIMED
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


def _config_value(config_file: Path, key: str) -> object:
    """The sweep config's ``key``, or None when it has none or does not parse."""
    try:
        return tomllib.loads(config_file.read_text()).get(key)
    except (OSError, tomllib.TOMLDecodeError):
        return None


def _description(config_file: Path) -> str:
    """The sweep config's ``description`` (Markdown), or "" when it has none."""
    value = _config_value(config_file, "description")
    return value.strip() if isinstance(value, str) else ""


def _table_metrics(config_file: Path) -> list[str] | None:
    """The sweep config's ``table_metrics`` (the columns the README's table shows), None for all."""
    value = _config_value(config_file, "table_metrics")
    if isinstance(value, str):
        value = [value]
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def _flat_gflops(records: list[dict]) -> bool:
    """Whether no task has two ok rows with different GFLOPs (a plot of them would be a vertical line)."""
    tasks: dict[str, set] = {}
    for r in records:
        if r["status"] == "ok" and r.get("flops"):
            tasks.setdefault(r["task"], set()).add(r["flops"].get("total"))
    return all(len(totals) < 2 for totals in tasks.values())


def _is_plot(path: Path) -> bool:
    return path.suffix in (".png", ".svg") and (path.stem == PLOT_STEM or path.stem.startswith(f"{PLOT_STEM}-"))


def _other_files(dest: Path) -> list[str]:
    """Visible files and folders in ``dest`` that publish did not write (a suite's own tables and figures)."""
    return sorted(p.name for p in dest.iterdir()
                  if not p.name.startswith(".") and p.name not in _OWN_FILES and not _is_plot(p))


def _copy_description(source: Path | None, target: Path) -> str:
    """``source`` copied to ``target`` (unless it is that file); the text to show, "" when there is none."""
    if source is not None and source.resolve() != target.resolve() and (
            not target.exists() or target.read_bytes() != source.read_bytes()):
        shutil.copyfile(source, target)
    return target.read_text().strip() if target.is_file() else ""


def publish(results_dir: str | os.PathLike, dest_dir: str | os.PathLike, *,
            config_path: str | os.PathLike | None = None, command: str | None = None,
            description_path: str | os.PathLike | None = None) -> Path:
    """Write ``dest_dir``/README.md, plot.png/.svg, config.toml and records/ from ``results_dir``; returns dest.

    The README shows, under its title, the sweep config's ``description`` and then the Markdown of
    ``description_path``, else of ``RESULTS/description.md``, else of the folder's own ``description.md``
    (kept, so a folder rebuilt from its records keeps its text); the file is copied to ``dest_dir``.
    """
    results_dir = Path(results_dir)
    records = sorted(latest_by_cell(require_records(results_dir)), key=lambda r: r["id"])
    config = Path(config_path) if config_path is not None else results_dir / "sweep.toml"
    if config_path is None and not config.is_file() and (results_dir / "tune.toml").is_file():
        config = results_dir / "tune.toml"  # the records of `fnabench tune`: its settings are their config
    if config_path is not None and not config.is_file():
        raise RecordError(f"sweep config {str(config)!r} not found; accepted: an existing TOML file")
    described = Path(description_path) if description_path is not None else results_dir / DESCRIPTION
    if description_path is not None and not described.is_file():
        raise RecordError(f"description {str(described)!r} not found; accepted: an existing Markdown file")
    dest = output_path(dest_dir, "leaderboard folder", folder=True)
    folder_text = _copy_description(described if described.is_file() else None, dest / DESCRIPTION)

    # records/: the latest record of every cell, in the canonical on-disk form; stale ones removed
    rec_dir = dest / "records"
    rec_dir.mkdir(exist_ok=True)
    keep = {f"{r['id']}.json" for r in records}
    for stale in rec_dir.glob("*.json"):
        if stale.name not in keep:
            stale.unlink()
    for r in records:
        write_record(rec_dir, r)

    # config.toml: the given sweep config, else RESULTS/sweep.toml, else the folder's own (a folder rebuilt
    # from its own records keeps its config, as it keeps its description)
    target = dest / "config.toml"
    if config_path is None and not config.is_file() and target.is_file():
        config = target
    has_config = config.is_file()
    if has_config:
        if not target.exists() or target.read_bytes() != config.read_bytes():
            shutil.copyfile(config, target)
    else:
        target.unlink(missing_ok=True)

    # plot.png / plot.svg (matplotlib optional)
    for old in list(dest.glob(f"{PLOT_STEM}.*")) + list(dest.glob(f"{PLOT_STEM}-*.*")):
        if _is_plot(old):
            old.unlink()
    if _flat_gflops(records):
        plot_paths, plot_note = [], _FLAT_PLOT
    else:
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
    if folder_text:
        lines += [folder_text, ""]
    legend = _LEGEND.format(timing=_timing_note(records))
    lines.append(f"{len(records)} cells ({failed} failed) over {len(tables)} task(s). {legend}")
    lines.append("")
    if plot_paths:
        lines += [f"![accuracy vs GFLOPs]({PLOT_STEM}.png)", ""]
    elif plot_note:
        lines += [f"_{plot_note}_", ""]
    shown = _table_metrics(target) if has_config else None
    lines.append(render(records, "github", metrics=shown).rstrip("\n"))
    if shown is not None:  # the narrowed table first, every metric a click away
        names = {m for r in records for m in r["metrics"]}
        lines += ["", f"<details><summary>All {len(names)} metrics</summary>", "",
                  render(records, "github").rstrip("\n"), "", "</details>"]
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
    if folder_text:
        lines.append(f"- description: [{DESCRIPTION}]({DESCRIPTION}) (hand-written; shown above)")
    others = _other_files(dest)
    if others:
        lines.append("- also in this folder, written by the tool that made the records, not by publish: "
                     + ", ".join(f"[{name}]({name})" for name in others))
    by_hand = f"edit only {DESCRIPTION} by hand" if folder_text else "do not edit it by hand"
    lines += ["", f"Regenerate this folder with `fnabench publish RESULTS DEST`; {by_hand}.", ""]
    text = "\n".join(lines)
    readme = dest / "README.md"
    if not readme.exists() or readme.read_text() != text:
        write_text_atomic(readme, text)
    return dest
