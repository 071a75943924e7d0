"""Where a sweep's cells run: this process, jobs on this machine, or a SLURM cluster, through submitit.

``fnabench run CONFIG --executor local|slurm`` (or ``kind`` in the config's ``[executor]`` table) splits
the cells that are not done yet into jobs, each holding cells of one model at one image size (so a job
loads its model once), at most ``cells_per_job`` of them. Every job runs its cells with the ordinary
:class:`~fnabench.harness.runner.Runner` and writes each record atomically into the shared results
folder; claim files (:mod:`.claims`) keep two jobs, or a job and a shell, off the same cell. Rerunning
the command submits only the cells still missing or failed, and leaves cells a live runner holds alone.

submitit is imported only here, inside the functions that submit (extra ``cluster``); parsing and
validating the ``[executor]`` table needs nothing but the standard library.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .._errors import UserError, one_line

KINDS = {"inline": "this process (the default)", "local": "submitit jobs on this machine (subprocesses)",
         "slurm": "submitit jobs on a SLURM cluster (sbatch job arrays)"}
JOBS_DIR = ".jobs"
MANIFEST = "submitted.jsonl"


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
    "stale_after_s": (_positive_number, "a number of seconds > 0"),
    "sbatch": (lambda v: isinstance(v, dict) and all(isinstance(x, (str, int, float)) and not isinstance(x, bool)
                                                    for x in v.values()),
               "a table of further sbatch options with string or number values, e.g. {\"mail-type\" = \"END\"}"),
}


def parse_executor(table: dict[str, Any] | None) -> ExecutorSettings:
    """The ``[executor]`` table checked key by key: one :class:`ExecutorError` line for the first problem."""
    from .config import ConfigError  # the config's own error type, so `fnabench run` reports it like any key

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


# ---------------------------------------------------------------------------------------------
# planning


def plan_jobs(cells: list, cells_per_job: int) -> list[list]:
    """Cells split into jobs: each job holds cells of one (model, image size), at most ``cells_per_job`` (0: all)."""
    groups: dict[tuple, list] = {}
    for cell in cells:
        groups.setdefault((cell.model, cell.setting("image_size")), []).append(cell)
    jobs = []
    for group in groups.values():
        size = cells_per_job or len(group)
        jobs += [group[i:i + size] for i in range(0, len(group), size)]
    return jobs


def pending_cells(config) -> tuple[list, list]:
    """(cells to submit: missing or failed, cells a live runner holds) of ``config``'s grid."""
    from . import claims
    from . import records as rec
    from .runner import cells

    out = config.output_dir()
    done = {r["id"] for r in rec.read_records(out, strict=False) if r["status"] == "ok"} if out.is_dir() else set()
    held = {cid for cid, info in claims.list_claims(out).items()
            if info.stale(parse_executor(config.executor).stale_after_s) is None}
    todo = [c for c in cells(config) if c.id not in done]
    return [c for c in todo if c.id not in held], [c for c in todo if c.id in held]


# ---------------------------------------------------------------------------------------------
# the job


class CellJob:
    """What one submitit job runs: the sweep's runner on its share of the cells.

    With several GPUs a job runs one task per GPU; the tasks share the job's cells through claims.
    After a time-out or preemption submitit calls :meth:`checkpoint` and requeues the job, which then
    skips the cells already done.
    """

    def __call__(self, config, cell_ids: list[str], threads: int | None, stale_after: float,
                 retime: bool = False) -> dict[str, Any]:
        import torch

        from .config import check_device
        from .runner import Runner

        if threads:
            torch.set_num_threads(threads)
        check_device(config.device)
        rank = _local_rank()
        if config.device == "cuda" and torch.cuda.device_count() > 1:
            torch.cuda.set_device(rank % torch.cuda.device_count())  # "cuda" = this task's GPU; ids unchanged
        summary = Runner(config, quiet=True, only=cell_ids, stale_after=stale_after, retime=retime).run()
        return {"ran": summary.ran, "skipped": summary.skipped, "failed": summary.failed,
                "elsewhere": summary.elsewhere, "retimed": summary.retimed}

    def checkpoint(self, *args: Any, **kwargs: Any):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def _local_rank() -> int:
    for name in ("SUBMITIT_LOCAL_LOCALID", "SLURM_LOCALID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


# ---------------------------------------------------------------------------------------------
# submitting


@dataclass
class Submission:
    """What ``run`` with an executor did: the jobs it submitted and, when it waited, what they did."""

    out: Path
    kind: str
    jobs: list[tuple[str, list[str]]] = field(default_factory=list)  # (job id, cell ids)
    running: list[str] = field(default_factory=list)  # cells a live runner held: not submitted
    waited: bool = False
    ran: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    job_errors: list[tuple[str, str]] = field(default_factory=list)  # (job id, one line)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.job_errors

    def line(self) -> str:
        held = f"; {len(self.running)} cells left to runners already on them" if self.running else ""
        if not self.jobs:
            return f"nothing to submit: every cell is done or running{held}; records in {self.out}"
        cells = sum(len(c) for _, c in self.jobs)
        head = f"{len(self.jobs)} {self.kind} jobs for {cells} cells{held}"
        if not self.waited:
            ids = ", ".join(j for j, _ in self.jobs[:4]) + (" ..." if len(self.jobs) > 4 else "")
            return f"{head} submitted ({ids}); follow them with: fnabench status {self.out}"
        errors = f", {len(self.job_errors)} jobs failed" if self.job_errors else ""
        return f"{head}: {len(self.ran)} cells run, {len(self.failed)} failed{errors}; records in {self.out}"


def _require_submitit():
    from .._extras import require

    return require("submitit")


def _executor(settings: ExecutorSettings, folder: Path, config, n_tasks: int):
    submitit = _require_submitit()
    if settings.kind == "slurm":
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=settings.max_requeues)
        params: dict[str, Any] = {
            "time": settings.minutes(), "nodes": 1, "ntasks_per_node": n_tasks,
            "job_name": f"fnabench-{config.name}", "array_parallelism": settings.parallelism(),
            "setup": list(settings.setup) or None,
            "additional_parameters": dict(settings.sbatch) or None,
        }
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(settings, key):
                params[key] = getattr(settings, key)
        if _gpus(settings, config):
            params["gpus_per_node"] = _gpus(settings, config)
        if settings.cpus_per_job:
            params["cpus_per_task"] = settings.cpus_per_job
        if settings.mem_gb:
            gb = settings.mem_gb
            params["mem"] = f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"
        ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        return ex
    ex = submitit.LocalExecutor(folder=folder, max_num_timeout=settings.max_requeues)
    params = {"timeout_min": settings.minutes(), "tasks_per_node": n_tasks, "gpus_per_node": _gpus(settings, config)}
    if settings.setup:
        params["setup"] = list(settings.setup)
    ex.update_parameters(**params)
    return ex


def _gpus(settings: ExecutorSettings, config) -> int:
    if settings.gpus_per_job is not None:
        return settings.gpus_per_job
    return 1 if config.device.startswith("cuda") else 0


def _threads(settings: ExecutorSettings) -> int | None:
    """torch threads per job: ``cpus_per_job``; locally, this machine's cores shared by the parallel jobs."""
    if settings.cpus_per_job:
        return settings.cpus_per_job
    if settings.kind == "local":
        return max(1, (os.cpu_count() or 1) // settings.parallelism())
    return None  # SLURM: the node's allocation (torch reads it)


def submit(config, settings: ExecutorSettings, *, retime: bool = False,
           log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Submission:
    """Check the sweep (the runner's preflight), then submit its missing and failed cells as jobs.

    Waits for the jobs when ``settings.waits()`` (local does by default), else returns once they are queued.
    """
    from . import records as rec
    from .runner import Runner, cells

    _require_submitit()
    if settings.kind == "slurm" and (shutil.which("sbatch") is None or shutil.which("srun") is None):
        raise ExecutorError("--executor slurm: sbatch/srun not found on PATH, so this is not a SLURM login node; "
                            "accepted: run it where SLURM is, or --executor local")
    out = config.output_dir().resolve()
    rec.output_path(out, "results folder", folder=True, create=False)
    config = replace(config, out=str(out))
    if retime:
        todo, running = cells(config), []
    else:
        todo, running = pending_cells(config)
    # the runner's preflight, before anything is written: image sizes, layer ranges (on CPU: a login node has no GPU)
    checker = Runner(replace(config, device="cpu"), quiet=True)
    groups: dict[tuple, list] = {}
    for cell in todo:
        groups.setdefault((cell.model, cell.setting("image_size")), []).append(cell)
    checker.preflight(groups)
    rec.output_path(out, "results folder", folder=True)
    Runner(config, quiet=True)._save_config()
    result = Submission(out, settings.kind, running=[c.id for c in running])
    planned = plan_jobs(todo, settings.cells_per_job)
    if not planned:
        return result
    folder = Path(settings.log_dir).expanduser().resolve() if settings.log_dir else out / JOBS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    n_tasks = max(1, _gpus(settings, config)) if config.device == "cuda" else 1  # one runner per GPU
    executor = _executor(settings, folder / "%j", config, n_tasks)
    job_config = replace(config, source=None)  # jobs write records only; the submitter saved sweep.toml
    args = [(job_config, [c.id for c in group], _threads(settings), settings.stale_after_s, retime)
            for group in planned]
    if settings.kind == "local":
        return _run_local(executor, args, settings, result, out, log)
    with executor.batch():
        handles = [executor.submit(CellJob(), *a) for a in args]
    for handle, a in zip(handles, args, strict=True):
        _note_submission(out, handle, a[1], settings.kind)
        result.jobs.append((str(handle.job_id), a[1]))
    if settings.waits():
        _wait(list(zip(handles, args, strict=True)), result, log)
    return result


def _note_submission(out: Path, handle, cell_ids: list[str], kind: str) -> None:
    """One line per job in RESULTS/.jobs/submitted.jsonl, so ``fnabench status`` can say where a cell is queued."""
    from .records import now

    line = json.dumps({"job": str(handle.job_id), "executor": kind, "submitted": now(), "cells": cell_ids,
                       "stdout": str(handle.paths.stdout)}, sort_keys=True)
    with open(out / JOBS_DIR / MANIFEST, "a") as f:
        f.write(line + "\n")


def _run_local(executor, args: list[tuple], settings: ExecutorSettings, result: Submission, out: Path,
               log: Callable[[str], None]) -> Submission:
    """Local jobs, at most ``array_parallelism`` at a time (submitit's local executor starts all it is given)."""
    queue, active = list(args), []
    try:
        while queue or active:
            while queue and len(active) < settings.parallelism():
                a = queue.pop(0)
                handle = executor.submit(CellJob(), *a)
                _note_submission(out, handle, a[1], settings.kind)
                result.jobs.append((str(handle.job_id), a[1]))
                active.append((handle, a))
            finished = [(h, a) for h, a in active if h.done()]
            if not finished:
                time.sleep(0.2)
                continue
            for pair in finished:
                active.remove(pair)
                _collect(*pair, result, log)
    except KeyboardInterrupt:
        for handle, _ in active:
            handle.cancel(check=False)
        raise
    result.waited = True
    return result


def _wait(pairs: list[tuple], result: Submission, log: Callable[[str], None]) -> None:
    try:
        while pairs:
            for pair in [p for p in pairs if p[0].done()]:
                pairs.remove(pair)
                _collect(*pair, result, log)
            time.sleep(2.0)
    except KeyboardInterrupt:
        log("stopped waiting; the jobs go on. Follow them with: fnabench status " + str(result.out))
        raise
    result.waited = True


def _collect(handle, args: tuple, result: Submission, log: Callable[[str], None]) -> None:
    """A finished job's share of the summary; a crashed job is one line with its log's path."""
    try:
        outcomes = handle.results()  # one per task
    except Exception as err:  # the job died: its cells stay missing (their claims go stale) and are resubmitted
        text = [line for line in str(err).strip().splitlines() if line.strip()]
        reason = one_line(text[-1] if text else type(err).__name__)
        result.job_errors.append((str(handle.job_id), reason))
        log(f"job {handle.job_id} failed ({len(args[1])} cells): {reason[:300]}; log: {handle.paths.stderr}")
        return
    for outcome in outcomes:
        result.ran += outcome["ran"] + outcome.get("retimed", [])
        result.failed += [tuple(f) for f in outcome["failed"]]
