"""Sweeps through submitit: local jobs write the records one process writes; SLURM submission (with stand-in
sbatch/srun); what a rerun submits; ``fnabench status``."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import TINY_SWEEP

from fnabench.cli.main import main
from fnabench.harness import claims
from fnabench.harness import config as cfg
from fnabench.harness import records as rec
from fnabench.harness.executor import MANIFEST, pending_cells, plan_jobs
from fnabench.harness.executor_settings import parse_executor
from fnabench.harness.runner import cells

pytest.importorskip("timm")

#: two image sizes (two model groups) and five variants: 10 cells; 3 per job gives 4 jobs
SWEEP = TINY_SWEEP.replace("image_sizes = [32]", "image_sizes = [32, 48]").replace(
    'variants = ["fna:m=4,layers=-2:", "exact", "nystrom:m=4"]',
    'variants = ["fna:m=4,layers=-2:", "exact", "nystrom:m=4", "fna:m=8", "mask:tokens=all"]')


def _load(tmp_path: Path, text: str, out: str = "res"):
    (tmp_path / "sweep.toml").write_text(text)
    return cfg.override(cfg.load(tmp_path / "sweep.toml"), out=str(tmp_path / out))


def test_jobs_hold_one_model_and_size_each_and_at_most_cells_per_job(tmp_path):
    config = _load(tmp_path, SWEEP)
    grid = cells(config)
    jobs = plan_jobs(grid, 3)
    assert [len(j) for j in jobs] == [3, 2, 3, 2]
    assert all(len({(c.model, c.setting("image_size")) for c in job}) == 1 for job in jobs)
    assert sorted(c.id for job in jobs for c in job) == sorted(c.id for c in grid)
    assert [len(j) for j in plan_jobs(grid, 0)] == [5, 5]  # 0: a whole model and size per job


def _ok_record(cell_id: str, **changes) -> dict:
    """A minimal valid record for a cell id (what pending/status read: id, status, error)."""
    return {"schema": rec.SCHEMA_VERSION, "id": cell_id, "status": "ok", "model": "tiny:vit", "variant": "exact",
            "variant_short": "exact", "task": "fidelity:synthetic", "settings": {}, "metrics": {},
            "primary_metric": None, "higher_is_better": {}, "flops": None, "timing": None, "peak_memory_bytes": None,
            "environment": {}, "seed": 0, "started": rec.now(), "finished": rec.now(), "duration_s": 0.0,
            "error": None, **changes}


def test_a_rerun_submits_only_missing_and_failed_cells_and_leaves_running_ones(tmp_path):
    config = _load(tmp_path, SWEEP)
    grid = cells(config)
    out = Path(config.out)
    out.mkdir()
    for cell in grid[:6]:
        rec.write_record(out, _ok_record(cell.id))
    rec.write_record(out, _ok_record(grid[6].id, status="failed", error="RuntimeError: boom"))
    held = claims.try_claim(out, grid[7].id)
    try:
        todo, running = pending_cells(config)
    finally:
        held.release()
    assert [c.id for c in todo] == [grid[6].id, grid[8].id, grid[9].id]
    assert [c.id for c in running] == [grid[7].id]


def _one_thread_records(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in rec.read_records(out)}


@pytest.mark.slow
def test_local_executor_in_several_jobs_writes_the_records_one_process_writes(tmp_path, capsys):
    """The must-show: 2 submitit jobs (real subprocesses, run at once) give the same cells, metrics and FLOPs as
    one process; a rerun submits only the cell whose record went missing; nothing to submit once all are done."""
    pytest.importorskip("submitit")
    executor = '\n[executor]\nkind = "local"\ncells_per_job = 5\ncpus_per_job = 1\narray_parallelism = 2\n'
    (tmp_path / "jobs.toml").write_text(SWEEP + executor)
    (tmp_path / "one.toml").write_text(SWEEP)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the jobs run one torch thread each (cpus_per_job = 1): same arithmetic
    try:
        assert main(["run", str(tmp_path / "one.toml"), "--out", str(tmp_path / "one"), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main(["run", str(tmp_path / "jobs.toml"), "--out", str(tmp_path / "jobs"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2 local jobs for 10 cells: 10 cells run, 0 failed" in out and "### fidelity:synthetic" in out
    one, jobs = _one_thread_records(tmp_path / "one"), _one_thread_records(tmp_path / "jobs")
    assert sorted(one) == sorted(jobs) and len(one) == 10
    for cid, mine in jobs.items():
        assert mine["status"] == "ok" and mine["metrics"] == one[cid]["metrics"], mine["variant"]
        assert mine["flops"] == one[cid]["flops"] and mine["settings"] == one[cid]["settings"]
    manifest = [json.loads(line) for line in (tmp_path / "jobs" / ".jobs" / MANIFEST).read_text().splitlines()]
    assert len(manifest) == 2 and sorted(c for m in manifest for c in m["cells"]) == sorted(one)

    victim = sorted(jobs)[3]
    (tmp_path / "jobs" / f"{victim}.json").unlink()
    assert main(["run", str(tmp_path / "jobs.toml"), "--out", str(tmp_path / "jobs"), "--quiet"]) == 0
    assert "1 local jobs for 1 cells: 1 cells run" in capsys.readouterr().out
    manifest = (tmp_path / "jobs" / ".jobs" / MANIFEST).read_text().splitlines()
    assert len(manifest) == 3 and json.loads(manifest[-1])["cells"] == [victim]
    assert _one_thread_records(tmp_path / "jobs")[victim]["metrics"] == one[victim]["metrics"]
    assert main(["run", str(tmp_path / "jobs.toml"), "--out", str(tmp_path / "jobs"), "--quiet"]) == 0
    assert "nothing to submit: every cell is done or running" in capsys.readouterr().out


def _fake_slurm(bin_dir: Path, log: Path) -> None:
    """sbatch that keeps the script it is given and answers like SLURM; srun that only has to exist."""
    bin_dir.mkdir()
    scripts = {
        "sbatch": f'#!/bin/sh\ncp "$1" {log}/submitted.sh\necho "Submitted batch job 4242"\n',
        "srun": "#!/bin/sh\nexit 0\n",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755 | stat.S_IXUSR)


def test_slurm_submission_writes_the_job_array_the_table_asks_for(tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    _fake_slurm(tmp_path / "bin", tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    table = ('\n[executor]\nkind = "slurm"\npartition = "gpu"\naccount = "lab"\ngpus_per_job = 1\ncpus_per_job = 8\n'
             'mem_gb = 32\ntime_min = 90\narray_parallelism = 3\ncells_per_job = 5\n'
             'setup = ["source /shared/venv/bin/activate"]\nsbatch = {"mail-type" = "END"}\n')
    (tmp_path / "sweep.toml").write_text(SWEEP + table)
    assert main(["run", str(tmp_path / "sweep.toml"), "--out", str(tmp_path / "res"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2 slurm jobs for 10 cells submitted (4242_0, 4242_1); follow them with: fnabench status" in out
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("--partition=gpu", "--account=lab", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=32GB",
                 "--time=90", "--array=0-1%2", "--mail-type=END", "--job-name=fnabench-tiny", "--ntasks-per-node=1"):
        assert f"#SBATCH {line}" in script, line
    assert "source /shared/venv/bin/activate" in script and "submitit.core._submit" in script
    assert not list((tmp_path / "res").glob("*.json"))  # nothing ran here: the jobs run the cells
    assert (tmp_path / "res" / "sweep.toml").is_file()

    # status: every cell missing, each with the job it was submitted in; exit 1 (not all done)
    assert main(["status", str(tmp_path / "res")]) == 1
    status = capsys.readouterr().out
    assert "10 cells: 0 done, 0 failed, 0 running, 10 missing" in status and "slurm job 4242_1" in status


def test_a_gpu_sweep_can_be_submitted_from_a_login_node_without_one(tmp_path):
    """device = "cuda" is the jobs' business under SLURM; here only the name is checked."""
    table = '\n[executor]\nkind = "slurm"\n'
    config = _load(tmp_path, SWEEP.replace("timing_repeats = 1", 'timing_repeats = 1\ndevice = "cuda"') + table)
    assert config.device == "cuda" and parse_executor(config.executor).kind == "slurm"
    if not torch.cuda.is_available():
        with pytest.raises(cfg.ConfigError, match="torch sees no CUDA GPU"):
            _load(tmp_path, SWEEP.replace("timing_repeats = 1", 'timing_repeats = 1\ndevice = "cuda"'))


def test_status_names_done_failed_running_and_missing_cells(tmp_path, capsys):
    config = _load(tmp_path, TINY_SWEEP)
    res = Path(config.out)
    res.mkdir()
    (res / "sweep.toml").write_text(TINY_SWEEP)
    grid = cells(config)
    for cell in grid:
        rec.write_record(res, _ok_record(cell.id))
    assert main(["status", str(res)]) == 0
    assert "3 cells: 3 done, 0 failed, 0 running, 0 missing" in capsys.readouterr().out
    rec.write_record(res, _ok_record(grid[0].id, status="failed",
                                     error="FloatingPointError: non-finite fidelity metrics"))
    (res / f"{grid[1].id}.json").unlink()
    held = claims.try_claim(res, grid[1].id)
    try:
        assert main(["status", str(res), str(tmp_path / "sweep.toml")]) == 1
        out = capsys.readouterr().out
    finally:
        held.release()
    assert "3 cells: 1 done, 1 failed, 1 running, 0 missing" in out
    assert "FloatingPointError: non-finite fidelity metrics" in out and f"pid {os.getpid()}" in out
    assert "tiny:vit @32px | exact | fidelity:synthetic: FloatingPointError" in out
    assert "tiny:vit @32px | fna:layers=-2:,m=4 | fidelity:synthetic: " in out  # the running one, named
    assert main(["status", str(res)]) == 1
    assert "1 done, 1 failed, 0 running, 1 missing" in capsys.readouterr().out
    # a GPU sweep's status can be read where there is no GPU (its cells are other cells: the device is in their id)
    (res / "sweep.toml").write_text(TINY_SWEEP + 'device = "cuda"\n')
    assert main(["status", str(res)]) == 1
    out = capsys.readouterr().out
    assert "3 cells: 0 done, 0 failed, 0 running, 3 missing" in out and "2 records in the folder belong" in out
    # without a sweep config the grid is unknown: it says so, and counts what records and claims show
    (res / "sweep.toml").unlink()
    assert main(["status", str(res)]) == 1
    out = capsys.readouterr().out
    assert "2 cells: 1 done, 1 failed, 0 running" in out and "pass CONFIG" in out


def test_without_the_cluster_extra_an_executor_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    (tmp_path / "sweep.toml").write_text(TINY_SWEEP)
    code = main(["run", str(tmp_path / "sweep.toml"), "--out", str(tmp_path / "res"), "--executor", "local"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pip install 'fnabench[cluster]'" in err
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("refusal", [
    "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)",
    "sbatch: error: Batch job submission failed: Invalid partition name specified",
    "sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)",
])
def test_a_scheduler_refusal_is_one_line_quoting_it_exit_4_and_leaves_nothing(tmp_path, capsys, monkeypatch, refusal):
    """The environment this states: an sbatch that refuses every job (as a site with its controller down does)."""
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "srun"):
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\necho '{refusal}' >&2\nexit 1\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "sweep.toml").write_text(SWEEP + '\n[executor]\nkind = "slurm"\n')
    assert main(["run", str(tmp_path / "sweep.toml"), "--out", str(tmp_path / "res"), "--quiet"]) == 4
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert "the machine, not your input" in lines[0] and refusal.split("failed: ")[1] in lines[0]
    jobs = tmp_path / "res" / ".jobs"
    assert not jobs.exists() or not list(jobs.iterdir())  # no pickles or scripts a rerun would trip over
    assert not list((tmp_path / "res").glob("*.json"))


def test_a_wait_on_an_unreachable_controller_ends_in_one_line_exit_4(tmp_path, capsys, monkeypatch):
    """sbatch accepts the jobs, then the controller goes away: squeue (and sacct) refuse every call."""
    pytest.importorskip("submitit")
    from fnabench.harness import executor

    _fake_slurm(tmp_path / "bin", tmp_path)
    refusal = "squeue: error: Unable to contact slurm controller (connect failure)"
    for name in ("squeue", "sacct"):
        script = tmp_path / "bin" / name
        script.write_text(f"#!/bin/sh\necho '{refusal.replace('squeue', name)}' >&2\nexit 1\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(executor, "SCHEDULER_POLL_S", 0.0)
    (tmp_path / "sweep.toml").write_text(SWEEP + '\n[executor]\nkind = "slurm"\n')
    assert main(["run", str(tmp_path / "sweep.toml"), "--out", str(tmp_path / "res"), "--quiet", "--wait"]) == 4
    lines = [line for line in capsys.readouterr().err.splitlines() if "the machine, not your input" in line]
    assert len(lines) == 1 and refusal in lines[0] and "fnabench status" in lines[0]


def test_a_job_on_its_last_run_at_its_time_limit_records_its_unfinished_cells_as_failed(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    from fnabench.harness.executor import CellJob

    config = _load(tmp_path, TINY_SWEEP)
    grid = cells(config)
    done = grid[0]
    main(["run", str(tmp_path / "sweep.toml"), "--out", str(tmp_path / "res"), "--quiet", "--variants", "exact"])
    assert (tmp_path / "res" / f"{done.id}.json").is_file()  # exact's cell: done before the time limit
    ids = [c.id for c in grid]
    job = CellJob(max_requeues=2)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_JOB_END_TIME", "0")  # past: this is the time-limit signal
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # one requeue behind it, another allowed: nothing recorded
    job.checkpoint(config, ids, None, 600.0, False)
    assert sorted(p.stem for p in (tmp_path / "res").glob("*.json")) == sorted([done.id])
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # the last allowed run
    again = job.checkpoint(config, ids, None, 600.0, False)
    records = {r["id"]: r for r in rec.read_records(tmp_path / "res")}
    assert records[done.id]["status"] == "ok"  # a finished cell keeps its record
    failed = [r for r in records.values() if r["status"] == "failed"]
    assert len(failed) == len(ids) - 1 and all(
        r["error"].startswith("time limit: SLURM job 77.0 reached its time limit on run 3 of 3") for r in failed)
    assert again.args[1] == ids  # the job is handed back to submitit as it was (it decides not to requeue)


def test_the_schedulers_stop_signal_ends_the_job_instead_of_failing_the_cell():
    submitit = pytest.importorskip("submitit")
    from fnabench.harness.runner import stops_the_job

    assert stops_the_job(submitit.core.utils.UncompletedJobError("Job not requeued because: timed-out too many times."))
    assert not stops_the_job(RuntimeError("a cell's own failure"))
