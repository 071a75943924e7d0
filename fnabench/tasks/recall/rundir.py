"""The on-disk layout of a run: config, costs, training log, checkpoints, evaluations; atomic writes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from fnabench import _io
from fnabench.tasks.recall.run_config import ConfigError, RunConfig

CONFIG = "config.json"
COSTS = "costs.json"
LOG = "log.jsonl"
RESUME = "resume.pt"
CHECKPOINTS = "checkpoints"
EVALS = "eval"
_STEP_FILE = re.compile(r"step_(\d+)\.pt$")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename, so a reader never sees half a file."""
    _io.write_text_atomic(path, text)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file and a rename."""
    _io.write_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def is_run(run_dir: str | Path) -> bool:
    return (Path(run_dir) / CONFIG).is_file()


def load_config(run_dir: str | Path) -> RunConfig:
    """The run's stored config; a directory that is not a run is a ConfigError."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a recall run directory (no {CONFIG}); train one with 'recall train'")
    return RunConfig.from_dict(read_json(path)["config"]).validate()


def save_config(run_dir: Path, config: RunConfig, extra: dict | None = None) -> None:
    write_json(run_dir / CONFIG, {"config": config.to_dict(), **(extra or {})})


def step_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every saved checkpoint, in step order."""
    folder = Path(run_dir) / CHECKPOINTS
    found = []
    for path in folder.glob("step_*.pt") if folder.is_dir() else []:
        match = _STEP_FILE.search(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def pick_checkpoint(run_dir: str | Path, step: int | None, purpose: str) -> tuple[int, Path]:
    """(step, path) of the checkpoint at ``step`` (None: the last); a one-line error naming ``purpose`` if absent."""
    checkpoints = dict(list_checkpoints(run_dir))
    if not checkpoints:
        raise ConfigError(f"{run_dir} has no checkpoints to {purpose}")
    step = max(checkpoints) if step is None else step
    if step not in checkpoints:
        raise ConfigError(f"{run_dir} has no checkpoint at step {step}")
    return step, checkpoints[step]


def read_log(run_dir: str | Path) -> list[dict]:
    """The training log's records (one per ``log_every`` steps)."""
    path = Path(run_dir) / LOG
    if not path.is_file():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_log(run_dir: Path, step: int) -> None:
    """Drop log records past ``step`` (after resuming from it, those steps are redone)."""
    kept = [r for r in read_log(run_dir) if r["step"] <= step]
    atomic_write_text(run_dir / LOG, "".join(json.dumps(r) + "\n" for r in kept))


def append_log(run_dir: Path, record: dict) -> None:
    with open(run_dir / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def eval_path(run_dir: str | Path, tag: str, step: int) -> Path:
    return Path(run_dir) / EVALS / tag / f"step_{step:08d}.json"
