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

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fnabench._errors import EnvironmentFault, one_line
from fnabench._extras import require
from fnabench.harness import claims
from fnabench.harness import records as rec
from fnabench.harness.config import check_device
from fnabench.harness.executor_settings import (
    ExecutorError,
    ExecutorSettings,
    parse_executor,
)
from fnabench.harness.records import now
from fnabench.harness.runner import Runner, cells, fail_unfinished

JOBS_DIR = ".jobs"
MANIFEST = "submitted.jsonl"
















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
    skips the cells already done; on its last allowed run (``max_requeues`` requeues behind it) a job that
    hits its time limit records each cell it did not finish as failed, with the reason, so ``status`` says
    why and a rerun submits them again.
    """

    def __init__(self, max_requeues: int = 3) -> None:
        self.max_requeues = max_requeues

    def __call__(self, config, cell_ids: list[str], threads: int | None, stale_after: float,
                 retime: bool = False) -> dict[str, Any]:
        import torch


        if threads:
            torch.set_num_threads(threads)
        check_device(config.device)
        rank = _local_rank()
        if config.device == "cuda" and torch.cuda.device_count() > 1:
            torch.cuda.set_device(rank % torch.cuda.device_count())  # "cuda" = this task's GPU; ids unchanged
        summary = Runner(config, quiet=True, only=cell_ids, stale_after=stale_after, retime=retime).run()
        return {"ran": summary.ran, "skipped": summary.skipped, "failed": summary.failed,
                "elsewhere": summary.elsewhere, "retimed": summary.retimed}

    def checkpoint(self, config, cell_ids: list[str], *args: Any, **kwargs: Any):
        from submitit.helpers import DelayedSubmission

        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if restarts >= self.max_requeues and _near_time_limit():  # submitit will not requeue it again
            fail_unfinished(config, cell_ids, f"time limit: SLURM job {claims.job_key() or '?'} reached its time "
                            f"limit on run {restarts + 1} of {self.max_requeues + 1} (max_requeues="
                            f"{self.max_requeues}) before this cell finished; rerun to submit it again, with a "
                            "larger [executor] time_min or fewer cells_per_job")
        return DelayedSubmission(self, config, cell_ids, *args, **kwargs)


def _near_time_limit(margin_s: float = 180.0) -> bool:
    """Whether this SLURM job is within ``margin_s`` of its end time (a time-limit signal, not a preemption);
    True where SLURM does not say."""
    end = os.environ.get("SLURM_JOB_END_TIME", "")
    return not end.isdigit() or float(end) - time.time() <= margin_s


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
    return require("submitit")


def _executor(settings: ExecutorSettings, folder: Path, config, n_tasks: int):
    submitit = _require_submitit()
    if settings.kind == "slurm":
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=settings.max_requeues)
        params: dict[str, Any] = {
            "time": settings.minutes(), "nodes": 1, "ntasks_per_node": n_tasks,
            "job_name": f"fnabench-{config.name}", "array_parallelism": settings.parallelism(),
            "signal_delay_s": settings.signal_delay_s,
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
    before = set(folder.iterdir())
    try:  # submitit echoes a failed sbatch's stderr itself; the one line below quotes it instead
        with contextlib.redirect_stderr(io.StringIO()), executor.batch():
            handles = [executor.submit(CellJob(settings.max_requeues), *a) for a in args]
    except (subprocess.CalledProcessError, _submitit_error()) as err:
        for path in set(folder.iterdir()) - before:  # the refused jobs' pickles and scripts: nothing to trip over
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        raise SchedulerError(f"sbatch refused the submission: {scheduler_message(err)}; nothing was submitted "
                             f"and nothing was left in {folder}; rerun the same command once the scheduler "
                             "accepts jobs") from None
    for handle, a in zip(handles, args, strict=True):
        _note_submission(out, handle, a[1], settings.kind)
        result.jobs.append((str(handle.job_id), a[1]))
    if settings.waits():
        _wait(list(zip(handles, args, strict=True)), result, log, slurm=True)
    return result


class SchedulerError(EnvironmentFault):
    """The scheduler refused a submission or a query (controller down, unknown partition or account, an option or
    time limit the site rejects): its own words in one line, exit 4."""


def _submitit_error() -> type[BaseException]:
    return _require_submitit().core.utils.FailedJobError


def scheduler_message(err: BaseException) -> str:
    """The scheduler's own line from a failed ``sbatch``/``squeue``/``sacct`` call (its first ``error:`` line)."""
    text = str(getattr(err, "stderr", None) or err)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [type(err).__name__])[0]


def _note_submission(out: Path, handle, cell_ids: list[str], kind: str) -> None:
    """One line per job in RESULTS/.jobs/submitted.jsonl, so ``fnabench status`` can say where a cell is queued."""
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
                handle = executor.submit(CellJob(settings.max_requeues), *a)
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


#: while waiting on SLURM jobs: how often squeue is asked, and after how many refusals in a row the wait stops
SCHEDULER_POLL_S = 30.0
SCHEDULER_REFUSALS = 3


def squeue_refusal(job_ids: list[str]) -> str | None:
    """None while ``squeue`` answers for these jobs; else its own error line (controller down, ...).

    submitit's own watcher only warns when ``sacct`` fails and keeps polling, so a wait on an unreachable
    controller would never end."""
    try:
        subprocess.run(["squeue", "--noheader", "-j", ",".join(job_ids)], capture_output=True, text=True,
                       timeout=60, check=True)
    except FileNotFoundError:
        return "squeue not found on PATH"
    except subprocess.TimeoutExpired:
        return "squeue did not answer within 60 s"
    except subprocess.CalledProcessError as err:
        return scheduler_message(err)
    return None


def _wait(pairs: list[tuple], result: Submission, log: Callable[[str], None], slurm: bool = False) -> None:
    refusals, last_poll = 0, time.monotonic()
    try:
        while pairs:
            for pair in [p for p in pairs if p[0].done()]:
                pairs.remove(pair)
                _collect(*pair, result, log)
            if slurm and pairs and time.monotonic() - last_poll >= SCHEDULER_POLL_S:
                last_poll = time.monotonic()
                refusal = squeue_refusal([str(p[0].job_id) for p in pairs])
                refusals = refusals + 1 if refusal else 0
                if refusals >= SCHEDULER_REFUSALS:
                    raise SchedulerError(f"squeue refused {refusals} times in a row while fnabench waited for its "
                                         f"jobs: {refusal}; the jobs may still run: follow them with fnabench "
                                         f"status {result.out} once the scheduler answers")
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
