"""Records: one JSON file per (model, variant, task, settings) cell, written atomically.

A record carries everything needed to trust it later: canonical identity strings, metrics with
their direction, how many items stand behind them (``items``; ``proportions`` names the metrics
that are a share of them), counted FLOPs, timings with spread, environment and versions, seed,
start/end time, and the error of a failed cell. The file name is a hash of the cell's identity, so a rerun
finds finished cells and skips them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, TypedDict

from fnabench import _io
from fnabench._errors import UserError

SCHEMA_VERSION = 1

#: fields every record has, and their JSON types
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema": int,
    "id": str,
    "status": str,
    "model": str,
    "variant": str,
    "variant_short": str,
    "task": str,
    "settings": dict,
    "metrics": dict,
    "primary_metric": (str, type(None)),
    "higher_is_better": dict,
    "flops": (dict, type(None)),
    "timing": (dict, type(None)),
    "peak_memory_bytes": (int, type(None)),
    "environment": dict,
    "seed": int,
    "started": str,
    "finished": str,
    "duration_s": (int, float),
    "error": (str, type(None)),
}
#: settings that are part of a cell's identity
IDENTITY_SETTINGS = ("image_size", "dtype", "device", "batch_size", "limit", "seed", "options")
STATUSES = ("ok", "failed")


class Record(TypedDict, total=False):
    """One record file: what a cell is, what it measured, and what it ran on (written as sorted JSON).

    Every producer (the sweep runner, task suites through :func:`fnabench.harness.suites.make_record`,
    ``fnabench.testing.make_record``) builds it with :func:`build_record`; :data:`REQUIRED_FIELDS` lists the
    keys every record has, the rest are optional.
    """

    schema: int  # SCHEMA_VERSION of the writer
    id: str  # Cell.id: a hash of model, variant, task and the IDENTITY_SETTINGS; the file is <id>.json
    status: str  # "ok" or "failed"
    model: str  # registry name, e.g. "offline:dinov2-s" or "recall:cpu-n5@seed0"
    variant: str  # the canonical spec string (defaults filled, keys sorted)
    variant_short: str  # the table's name: only keys that differ from their defaults
    task: str  # registry name, e.g. "fidelity:images"
    settings: dict[str, Any]  # image_size, dtype, device, batch_size, limit, seed, options (+ the suite's own)
    metrics: dict[str, float]  # name → value; empty for a failed cell
    primary_metric: str | None  # the metric a leaderboard ranks by
    higher_is_better: dict[str, bool]  # direction of each metric
    flops: dict[str, Any] | None  # counted FLOPs (measure.count_flops): total, attention, gflops, input_shape
    timing: dict[str, Any] | None  # median_s, quartiles, repeats, images_per_s, speedup_rounds, others_busy_cores
    peak_memory_bytes: int | None  # peak device memory of the timed forward, where measured
    environment: dict[str, Any]  # python, platform, device, device_name, versions, git_revision, cpu load
    seed: int  # the cell's seed
    started: str  # ISO time the cell started
    finished: str  # ISO time the record was written
    duration_s: float  # wall time of the cell
    error: str | None  # the one-line error of a failed cell
    # optional keys
    items: dict[str, int]  # how many test items stand behind the metrics, by name ("test", "queries", ...)
    proportions: dict[str, list]  # metric → [items key, scale]: the metric is a share of those items (for SEs)
    traceback: str  # a failed cell's last frames
    causal: dict[str, Any]  # decoder cells: {"leaks_future": bool} (a whole-sequence landmark selector)
    image_size: int | None  # the input size the model ran at (a sweep cell's; settings hold the asked one)
    kv_cache: dict[str, Any]  # decoder cells: the KV cache after prefill and one decoding step, against exact's
    fallback: dict[str, Any]  # fallback=auto cells: which layers ran the approximation and which ran exact
    weights: dict[str, str]  # an offline model's weights file, sha256 and training recipe's hash (models/cards.py)
    details: dict[str, Any]  # what a task reports beside its metrics (e.g. classify:'s per-class scores)
    provenance: str  # where a record came from when no run wrote it (recall-cpu: converted from its older records)
    recall: dict[str, Any]  # recall report results: what its side tables need (settings, points, curves)
    analysis: dict[str, Any]  # analyze results: the analysis summary and the ablation


def build_record(*, model: str, variant: str, task: str, settings: dict[str, Any], environment: dict[str, Any],
                 started: str, finished: str, duration_s: float, seed: int, variant_short: str,
                 status: str = "ok", metrics: dict[str, float] | None = None, primary_metric: str | None = None,
                 higher_is_better: dict[str, bool] | None = None, flops: dict[str, Any] | None = None,
                 timing: dict[str, Any] | None = None, peak_memory_bytes: int | None = None,
                 error: str | None = None, **extra: Any) -> Record:
    """The one way a record is made: schema and cell id added, the required keys filled, ``extra`` kept
    (optional keys and a producer's own). ``variant`` is used as given (callers pass the canonical string)."""
    cell = Cell(model, variant, task, tuple(sorted(settings.items())))
    record: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "id": cell.id, "status": status, "model": model, "variant": variant,
        "variant_short": variant_short, "task": task, "settings": settings, "metrics": dict(metrics or {}),
        "primary_metric": primary_metric, "higher_is_better": dict(higher_is_better or {}), "flops": flops,
        "timing": timing, "peak_memory_bytes": peak_memory_bytes, "environment": environment, "seed": seed,
        "started": started, "finished": finished, "duration_s": duration_s, "error": error,
    }
    record.update(extra)
    return record  # type: ignore[return-value]


class RecordError(UserError, ValueError):
    """A record file that does not follow the schema."""


@dataclass(frozen=True)
class Cell:
    """One (model, variant, task) under fixed settings: the unit a sweep runs and a record stores."""

    model: str
    variant: str
    task: str
    settings: tuple[tuple[str, Any], ...]

    @property
    def identity(self) -> dict[str, Any]:
        s = dict(self.settings)
        return {"model": self.model, "variant": self.variant, "task": self.task,
                **{k: s.get(k) for k in IDENTITY_SETTINGS}}

    @property
    def id(self) -> str:
        """Stable short hash of the identity: the record's file name."""
        blob = json.dumps(self.identity, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def setting(self, key: str, default: Any = None) -> Any:
        return dict(self.settings).get(key, default)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    here = Path(__file__).resolve().parents[2]
    if not (here / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    return (rev + ("+dirty" if dirty.stdout.strip() else "")) if rev else None


_ENV_CACHE: dict[str, Any] = {}


def environment(device: str = "cpu") -> dict[str, Any]:
    """Device name, Python/torch/host-library/fnabench versions and git revision."""
    import torch

    if not _ENV_CACHE:
        _ENV_CACHE.update({
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "versions": {d: _version(d) for d in ("fnabench", "torch", "torchvision", "open_clip_torch", "timm",
                                                  "transformers", "clip_benchmark", "mmsegmentation", "mmcv",
                                                  "mmcv-lite", "mmengine", "lmms_eval", "numpy") if _version(d)},
            "git_revision": _git_revision(),
        })
    env = dict(_ENV_CACHE)
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
    else:
        env["device_name"] = cpu_name()
    env["device"] = device
    return env


def cpu_name() -> str:
    """The CPU model (``model name`` in /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def nonfinite_metrics(metrics: dict[str, Any], task: str, variant: str) -> str | None:
    """Why a cell with these metrics is a failed one (a NaN or infinity measures nothing), or None."""
    broken = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
    if not broken:
        return None
    named = ", ".join(f"{k}={metrics[k]}" for k in broken)
    return f"metric(s) {named} of {task} under {variant} are not finite numbers"


def validate(record: dict[str, Any], source: str = "record") -> dict[str, Any]:
    """Check a record against the schema; raise :class:`RecordError` naming the first problem."""
    if not isinstance(record, dict):
        raise RecordError(f"{source}: a record is a JSON object, got {type(record).__name__}")
    for key, kind in REQUIRED_FIELDS.items():
        if key not in record:
            raise RecordError(f"{source}: missing field {key!r}")
        if not isinstance(record[key], kind):
            raise RecordError(f"{source}: field {key!r} has type {type(record[key]).__name__}")
    if record["schema"] != SCHEMA_VERSION:
        raise RecordError(f"{source}: schema {record['schema']} (this fnabench reads {SCHEMA_VERSION})")
    if record["status"] not in STATUSES:
        raise RecordError(f"{source}: status {record['status']!r}; accepted: {', '.join(STATUSES)}")
    if record["status"] == "failed" and not record["error"]:
        raise RecordError(f"{source}: a failed record needs its error text")
    for name, value in record["metrics"].items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise RecordError(f"{source}: metric {name!r} is not a number")
    if record["flops"] is not None:
        for key in ("total", "attention"):
            if not isinstance(record["flops"].get(key), int):
                raise RecordError(f"{source}: flops.{key} must be an integer FLOP count")
    if record["timing"] is not None and not isinstance(record["timing"].get("median_s"), (int, float)):
        raise RecordError(f"{source}: timing.median_s must be a number")
    items = record.get("items")
    if items is not None and not (isinstance(items, dict) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items.values())):
        raise RecordError(f"{source}: items must map names to counts (integers >= 0)")
    for name, over in (record.get("proportions") or {}).items():
        if not (isinstance(over, list) and len(over) == 2 and over[0] in (items or {})
                and isinstance(over[1], (int, float)) and over[1] > 0):
            raise RecordError(f"{source}: proportions.{name} must be [an items key, a scale > 0]")
    return record


def write_record(directory: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Validate and write ``record`` as ``<id>.json`` atomically (temp file + rename)."""
    validate(record)
    return write_text_atomic(Path(directory) / f"{record['id']}.json", json.dumps(record, indent=2, sort_keys=True))


class OutputPathError(UserError, ValueError):
    """An output path that cannot be written as asked (a file where a folder goes, a missing parent tree)."""


def output_path(path: str | os.PathLike, what: str, *, folder: bool = False, create: bool = True) -> Path:
    """``path`` checked for writing ``what`` (a file, or a folder when ``folder``); makes its parent folder
    (and the folder itself when ``folder``) unless ``create`` is false.

    Only one missing level is made: ``baselines/x.json`` in a fresh clone is fine, but a path whose
    grandparent is missing too is taken for a typo and refused, instead of creating a tree up to the root.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {str(path)!r} is a file; accepted: a folder (new or existing)")
    if not folder and path.is_dir():
        raise OutputPathError(f"{what} {str(path)!r} is a folder; accepted: a file path")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise OutputPathError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not parent.exists():
        if not parent.parent.is_dir():
            raise OutputPathError(f"{what} {str(path)!r}: neither {str(parent)!r} nor its parent exists; "
                                  "accepted: a path whose folder, or the folder above it, exists")
        if create:
            parent.mkdir(exist_ok=True)
    if folder and create:
        path.mkdir(exist_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (plus a final newline) to ``path`` via a temp file and rename: never half-written.

    The file gets the mode a plain ``open()`` would give it (0666 less the umask), not the temp file's 0600.
    """
    return _io.write_text_atomic(path, text.rstrip("\n") + "\n")


def record_files(path: str | os.PathLike) -> list[Path]:
    """Record files under ``path`` (a results folder, searched recursively, or one JSON file)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise RecordError(f"no results at {str(path)!r}: expected a folder of records or a record file")
    return sorted(p for p in path.rglob("*.json") if not p.name.startswith(".") and p.name != "baseline.json")


def read_records(paths: str | os.PathLike | Iterable[str | os.PathLike], *, strict: bool = True) -> list[dict]:
    """Load and validate every record under ``paths``; files that are not records are skipped unless strict."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for root in paths:
        for file in record_files(root):
            try:
                data = json.loads(file.read_text())
                if isinstance(data, dict) and "schema" not in data and not strict:
                    continue
                out.append(validate(data, str(file)))
            except json.JSONDecodeError as err:
                if strict:
                    raise RecordError(f"{file}: not valid JSON ({err.msg} at line {err.lineno})") from None
            except RecordError:
                if strict:
                    raise
    return out


def require_records(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[dict]:
    """:func:`read_records`, refusing a folder with no records in it (an empty table is a mistake, not a result)."""
    records = read_records(paths)
    if not records:
        names = [str(paths)] if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths]
        raise RecordError(f"no records under {', '.join(map(repr, names))}; accepted: a results folder "
                          "that `fnabench run` wrote, or record files")
    return records


def latest_by_cell(records: Iterable[dict]) -> list[dict]:
    """One record per cell id: the last finished one."""
    best: dict[str, dict] = {}
    for rec in records:
        if rec["id"] not in best or rec["finished"] >= best[rec["id"]]["finished"]:
            best[rec["id"]] = rec
    return list(best.values())
