"""The ``[executor]`` table of a sweep config: where its cells run (inline, local jobs, SLURM) and with what
resources, validated up front with one-line errors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fnabench._errors import ConfigError, UserError

KINDS = {"inline": "this process (the default)", "local": "submitit jobs on this machine (subprocesses)",
         "slurm": "submitit jobs on a SLURM cluster (sbatch job arrays)"}


class ExecutorError(UserError, ValueError):
    """An ``[executor]`` table or ``--executor`` flag that cannot run; one line saying what is accepted."""


@dataclass(frozen=True)
class ExecutorSettings:
    """The ``[executor]`` table of a sweep config, validated. Only ``kind`` matters for ``inline``."""

    kind: str = "inline"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_job: int | None = None  # default: 1 on a CUDA device, else 0
    cpus_per_job: int | None = None  # default (local): this machine's cores / array_parallelism
    mem_gb: float | None = None
    time_min: int | None = None  # default: slurm 60, local 24 h
    array_parallelism: int | None = None  # default: local 2, slurm 64
    cells_per_job: int = 8  # 0: every cell of a model and image size in one job
    setup: tuple[str, ...] = ()
    log_dir: str | None = None  # default: RESULTS/.jobs
    wait: bool | None = None  # default: local waits, slurm submits and returns
    max_requeues: int = 3  # submitit requeues a job that hit its time limit or was preempted
    signal_delay_s: int = 90  # SLURM signals a job this long before its time limit (submitit then requeues it)
    stale_after_s: float = 600.0  # a claim without a heartbeat for this long is taken over
    sbatch: dict[str, Any] = field(default_factory=dict)  # further sbatch options, e.g. {"mail-type" = "END"}

    def parallelism(self) -> int:
        if self.array_parallelism is not None:
            return self.array_parallelism
        return 2 if self.kind == "local" else 64

    def minutes(self) -> int:
        if self.time_min is not None:
            return self.time_min
        return 60 if self.kind == "slurm" else 24 * 60

    def waits(self) -> bool:
        return self.kind == "local" if self.wait is None else self.wait


def _nonempty_str(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _int(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), f"an integer >= {low}"


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


#: each key of ``[executor]``: (check, what is accepted)
_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "kind": (lambda v: v in KINDS, f"one of {', '.join(KINDS)}"),
    "partition": (_nonempty_str, "a SLURM partition name (a string)"),
    "account": (_nonempty_str, "a SLURM account (a string)"),
    "qos": (_nonempty_str, "a SLURM QOS (a string)"),
    "constraint": (_nonempty_str, "a SLURM node constraint (a string)"),
    "gpus_per_job": _int(0),
    "cpus_per_job": _int(1),
    "mem_gb": (_positive_number, "a number of GB > 0"),
    "time_min": _int(1),
    "array_parallelism": _int(1),
    "cells_per_job": (_int(0)[0], "an integer >= 0 (0: all cells of a model and image size in one job)"),
    "setup": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
              "a list of shell lines run before each job, e.g. [\"source .venv/bin/activate\"]"),
    "log_dir": (_nonempty_str, "a folder path (a string)"),
    "wait": (lambda v: isinstance(v, bool), "true or false"),
    "max_requeues": _int(0),
    "signal_delay_s": (_int(1)[0], "an integer >= 1 (seconds before the time limit that SLURM signals the job)"),
    "stale_after_s": (_positive_number, "a number of seconds > 0"),
    "sbatch": (lambda v: isinstance(v, dict) and all(isinstance(x, (str, int, float)) and not isinstance(x, bool)
                                                    for x in v.values()),
               "a table of further sbatch options with string or number values, e.g. {\"mail-type\" = \"END\"}"),
}


def parse_executor(table: dict[str, Any] | None) -> ExecutorSettings:
    """The ``[executor]`` table checked key by key: one :class:`ExecutorError` line for the first problem."""
    table = dict(table or {})
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise ConfigError(f"unknown [executor] key {unknown[0]!r}; accepted: {', '.join(_KEYS)}")
    for key, value in table.items():
        check, accepted = _KEYS[key]
        if not check(value):
            raise ConfigError(f"[executor] {key} = {value!r} is not accepted; accepted: {accepted}")
    if "setup" in table:
        table["setup"] = tuple(table["setup"])
    if "mem_gb" in table:
        table["mem_gb"] = float(table["mem_gb"])
    return ExecutorSettings(**table)
