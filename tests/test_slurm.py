"""Sweeps on a real SLURM cluster (``tools/slurm-local.sh start`` makes a one-node one on this machine): the
same records as inline, and every fault a scheduler deals in — a cancelled job, a requeued job, a job that
hits its time limit, two submitters on one folder — ends with every cell recorded once and nothing
half-written. Marked ``slurm``; without ``sbatch`` or a controller that answers, skipped with the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

FNABENCH = str(Path(sys.executable).with_name("fnabench"))
LOCAL_CONF = Path(os.environ.get("FNABENCH_SLURM_DIR", "/tmp/fnabench-slurm")) / "slurm.conf"
#: a cell of a few seconds on one core (a 96-px tiny ViT over 96 synthetic images, timed 40 times): long enough
#: that a job of 8 is still running when the test cancels or requeues it (SLURM's KillWait here is 5 s)
SLOW = {"image_sizes": [96], "limit": 96, "timing_repeats": 40}


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    """The environment the SLURM commands need, or a skip that says why there is no cluster."""
    env = dict(os.environ)
    if "SLURM_CONF" not in env and LOCAL_CONF.is_file():
        env["SLURM_CONF"] = str(LOCAL_CONF)
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch is not on PATH: no SLURM here (tools/slurm-local.sh start makes a one-node cluster)")
    answer = subprocess.run(["sinfo", "--noheader", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
    if answer.returncode != 0 or not answer.stdout.strip():
        pytest.skip(f"no SLURM controller answers ({(answer.stderr or 'no node').strip()}): "
                    "tools/slurm-local.sh start")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _sweep(path: Path, name: str, *, variants: list[str], executor: dict, seeds: list[int] | None = None,
           slow: bool = False) -> Path:
    settings = {"image_sizes": [32], "limit": 4, "timing_repeats": 1, **(SLOW if slow else {})}
    lines = [f'name = "{name}"', 'models = ["tiny:vit"]', 'tasks = ["fidelity:synthetic"]',
             f"variants = {json.dumps(variants)}", "batch_size = 2",
             *(f"{k} = {json.dumps(v)}" for k, v in settings.items())]
    if seeds:
        lines.append(f"seeds = {json.dumps(seeds)}")
    lines.append("\n[executor]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in {"kind": "slurm", "cpus_per_job": 1, **executor}.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _fnabench(env, *args, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([FNABENCH, *map(str, args)], env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def _records(results: Path) -> dict[str, dict]:
    """Every record in ``results``, by cell id; each one must parse (nothing half-written)."""
    out = {}
    for path in sorted(results.glob("*.json")):
        record = json.loads(path.read_text())
        out[record["id"]] = record
    return out


def _until(predicate, timeout: float, what: str, every: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _jobs(env, name: str) -> list[tuple[str, str]]:
    """(job id, state) of this sweep's jobs that SLURM still holds."""
    out = subprocess.run(["squeue", "--noheader", "-o", "%i %T", "-n", f"fnabench-{name}"], env=env,
                         capture_output=True, text=True, timeout=60).stdout
    return [tuple(line.split()) for line in out.splitlines() if line.strip()]


def _leftovers(results: Path) -> list[str]:
    """Temp files of an interrupted write (a record is written to a temp file, then renamed into place)."""
    return [p.name for p in results.iterdir() if p.is_file() and not p.name.endswith((".json", ".toml", ".jsonl"))]


def test_a_sweep_through_slurm_writes_what_the_same_sweep_inline_writes(cluster, tmp_path):
    config = _sweep(tmp_path / "sweep.toml", "same", variants=["exact", "fna:m=4", "nystrom:m=4", "fna:m=8"],
                    executor={"cells_per_job": 2})
    _fnabench(cluster, "run", config, "--out", tmp_path / "inline", "--executor", "inline", "--quiet")
    done = _fnabench(cluster, "run", config, "--out", tmp_path / "slurm", "--wait", "--quiet")
    assert "2 slurm jobs for 4 cells: 4 cells run, 0 failed" in done.stdout
    inline, slurm = _records(tmp_path / "inline"), _records(tmp_path / "slurm")
    assert sorted(inline) == sorted(slurm) and len(inline) == 4
    for cell, record in inline.items():
        other = slurm[cell]
        assert record["status"] == other["status"] == "ok"
        for key in ("metrics", "flops", "settings", "variant", "model", "task", "items"):
            assert record[key] == other[key], (cell, key)


def test_a_cancelled_job_loses_no_finished_cell_and_a_rerun_submits_only_the_rest(cluster, tmp_path):
    variants = [f"fna:m={m}" for m in range(2, 10)]
    config = _sweep(tmp_path / "sweep.toml", "cancel", variants=variants, executor={"cells_per_job": 8}, slow=True)
    results = tmp_path / "res"
    _fnabench(cluster, "run", config, "--out", results, "--quiet")
    (job, _), = _until(lambda: _jobs(cluster, "cancel"), 60, "the job to be queued")
    _until(lambda: len(_records(results)) >= 2, 300, "two finished cells")
    subprocess.run(["scancel", job], env=cluster, check=True, timeout=60)
    _until(lambda: not _jobs(cluster, "cancel"), 120, "the cancelled job to leave the queue")
    before = {cell: (results / f"{cell}.json").read_bytes() for cell in _records(results)}
    assert 2 <= len(before) < 8 and not _leftovers(results)
    status = _fnabench(cluster, "status", results, check=False).stdout
    assert f"8 cells: {len(before)} done, 0 failed" in status
    again = _fnabench(cluster, "run", config, "--out", results, "--wait", "--quiet")
    assert f"1 slurm jobs for {8 - len(before)} cells: {8 - len(before)} cells run, 0 failed" in again.stdout
    after = _records(results)
    assert len(after) == 8 and all(r["status"] == "ok" for r in after.values())
    for cell, raw in before.items():  # a cell finished before the cancel was neither lost nor run again
        assert (results / f"{cell}.json").read_bytes() == raw
    print(f"scancel: {len(before)} of 8 cells done before it, kept byte for byte; the rerun submitted "
          f"{8 - len(before)}; 8 ok")


def test_a_requeued_job_takes_its_cells_over_and_runs_none_twice(cluster, tmp_path):
    variants = [f"fna:m={m}" for m in range(2, 10)]
    config = _sweep(tmp_path / "sweep.toml", "requeue", variants=variants, executor={"cells_per_job": 8},
                    slow=True)
    results = tmp_path / "res"
    _fnabench(cluster, "run", config, "--out", results, "--quiet")
    (job, _), = _until(lambda: _jobs(cluster, "requeue"), 60, "the job to be queued")
    _until(lambda: len(_records(results)) >= 2, 300, "two finished cells")
    subprocess.run(["scontrol", "requeue", job], env=cluster, check=True, timeout=60)
    early = {cell: (results / f"{cell}.json").read_bytes() for cell in _records(results)}
    _until(lambda: len(_records(results)) == 8 and not _jobs(cluster, "requeue"), 600,
           "the requeued job to finish every cell")
    after = _records(results)
    assert all(r["status"] == "ok" for r in after.values()) and not _leftovers(results)
    for cell, raw in early.items():
        assert (results / f"{cell}.json").read_bytes() == raw, f"{cell} ran again after the requeue"
    restarts = subprocess.run(["scontrol", "show", "job", job], env=cluster, capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts or not restarts  # the job record may have aged out of the controller
    status = _fnabench(cluster, "status", results).stdout
    assert "8 cells: 8 done, 0 failed, 0 running, 0 missing" in status
    print(f"requeue: {len(early)} of 8 cells done before it, kept byte for byte; the requeued run took the other "
          f"{8 - len(early)}; 8 ok")


def test_two_submitters_on_one_folder_run_every_cell_once(cluster, tmp_path):
    config = _sweep(tmp_path / "sweep.toml", "twice", variants=["exact", "fna:m=4", "fna:m=6", "nystrom:m=4"],
                    executor={"cells_per_job": 1}, slow=True)
    results = tmp_path / "res"
    procs = [subprocess.Popen([FNABENCH, "run", str(config), "--out", str(results), "--wait", "--quiet"],
                              env=cluster, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    ran = 0
    for out, _ in outs:
        line = next(x for x in out.splitlines() if "slurm jobs for" in x or "nothing to submit" in x)
        ran += int(line.split(": ")[1].split(" cells run")[0]) if "cells run" in line else 0
    assert ran == 4, outs  # the second submitter's jobs found each cell done or claimed: none ran twice
    records = _records(results)
    assert len(records) == 4 and all(r["status"] == "ok" for r in records.values())
    print(f"two submitters: 4 cells, {ran} runs in all, 4 ok")


@pytest.mark.slow
def test_two_hundred_cells_as_one_array_then_status_and_publish(cluster, tmp_path):
    seeds = list(range(50))
    config = _sweep(tmp_path / "sweep.toml", "load", variants=["exact", "fna:m=4", "fna:m=8", "nystrom:m=4"],
                    executor={"cells_per_job": 10}, seeds=seeds)
    results = tmp_path / "res"
    start = time.monotonic()
    done = _fnabench(cluster, "run", config, "--out", results, "--wait", "--quiet")
    wall = time.monotonic() - start
    assert "20 slurm jobs for 200 cells: 200 cells run, 0 failed" in done.stdout, done.stdout[-1000:]
    jobs = {json.loads(line)["job"].split("_")[0] for line in (results / ".jobs" / "submitted.jsonl").read_text()
            .splitlines()}
    assert len(jobs) == 1  # one array
    assert "200 cells: 200 done, 0 failed, 0 running, 0 missing" in _fnabench(cluster, "status", results).stdout
    _fnabench(cluster, "publish", results, tmp_path / "board")
    assert (tmp_path / "board" / "README.md").is_file() and len(list((tmp_path / "board" / "records").iterdir())) == 200
    print(f"load: 200 cells, 20 array tasks, {wall:.0f} s wall")


@pytest.mark.slow
def test_a_job_past_its_time_limit_is_requeued_then_its_cells_fail_with_the_reason(cluster, tmp_path):
    # a two-minute limit, signalled 75 s before it (SLURM checks limits every 30 s): each run gets 45-75 s of
    # cells, submitit requeues the job max_requeues = 1 time, and the last run records every cell it did not
    # finish as failed; 80 cells of about 2 s are more than two runs finish
    variants = [f"fna:m={m}" for m in range(2, 42)]
    config = _sweep(tmp_path / "sweep.toml", "timeout", variants=variants, seeds=[0, 1],
                    executor={"cells_per_job": 80, "time_min": 2, "signal_delay_s": 75, "max_requeues": 1},
                    slow=True)
    results = tmp_path / "res"
    _fnabench(cluster, "run", config, "--out", results, "--quiet")
    _until(lambda: len(_records(results)) == 80 and not _jobs(cluster, "timeout"), 900,
           "every cell to be recorded, done or failed, and the job to end", every=2)
    records = _records(results)
    failed = [r for r in records.values() if r["status"] == "failed"]
    assert failed and not _leftovers(results)
    assert all(r["error"].startswith("time limit: SLURM job") and "run 2 of 2 (max_requeues=1)" in r["error"]
               for r in failed)
    status = _fnabench(cluster, "status", results, check=False)
    assert status.returncode == 1 and f"80 cells: {80 - len(failed)} done, {len(failed)} failed" in status.stdout
    assert "time limit: SLURM job" in status.stdout
    print(f"time limit: 80 cells, {80 - len(failed)} done over 2 runs, {len(failed)} failed with the reason")
