"""Claims: two runners on one results folder never run a cell twice; a dead runner's claim is taken over."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TINY_SWEEP

from fnabench.harness import claims
from fnabench.harness import records as rec

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_a_live_claim_keeps_others_out_and_release_frees_it(tmp_path):
    first = claims.try_claim(tmp_path, "abc")
    assert first is not None and first.holds()
    assert claims.try_claim(tmp_path, "abc") is None  # live: same host, this process is alive
    info = claims.list_claims(tmp_path)["abc"]
    assert info.owner["pid"] == os.getpid() and info.stale() is None
    first.release()
    assert claims.list_claims(tmp_path) == {}
    second = claims.try_claim(tmp_path, "abc")
    assert second is not None
    second.release()


def test_the_heartbeat_keeps_a_claim_fresh(tmp_path):
    claim = claims.try_claim(tmp_path, "beat", heartbeat=0.05)
    path = claims.claims_dir(tmp_path) / "beat.claim"
    os.utime(path, (time.time() - 1000, time.time() - 1000))
    time.sleep(0.3)
    assert claims.read_claim(path).age_s < 10
    claim.release()


def _foreign_claim(results: Path, cell: str, age_s: float, host: str = "elsewhere.example") -> Path:
    """A claim written by a runner on another host whose last heartbeat was ``age_s`` ago."""
    folder = claims.claims_dir(results)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cell}.claim"
    path.write_text(json.dumps({"token": "t-" + cell, "host": host, "pid": 1, "started": rec.now()}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_another_hosts_claim_is_judged_by_its_heartbeat(tmp_path):
    _foreign_claim(tmp_path, "fresh", age_s=5)
    _foreign_claim(tmp_path, "old", age_s=900)
    assert claims.try_claim(tmp_path, "fresh", stale_after=600) is None
    taken = claims.try_claim(tmp_path, "old", stale_after=600)
    assert taken is not None and claims.list_claims(tmp_path)["old"].owner["host"] == socket.gethostname()
    taken.release()


def test_a_requeued_slurm_job_takes_back_the_claims_of_its_earlier_run(tmp_path, monkeypatch):
    """After a time-out or preemption SLURM requeues the job (same id, another node): no waiting for heartbeats."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", "1")
    path = _foreign_claim(tmp_path, "mine", age_s=5)
    owner = json.loads(path.read_text())
    path.write_text(json.dumps({**owner, "job": "4242.1"}))
    _foreign_claim(tmp_path, "sibling", age_s=5)  # rank 0 of the same job is a live sibling: kept
    path = claims.claims_dir(tmp_path) / "sibling.claim"
    path.write_text(json.dumps({**json.loads(path.read_text()), "job": "4242.0"}))
    assert claims.try_claim(tmp_path, "sibling") is None
    taken = claims.try_claim(tmp_path, "mine")
    assert taken is not None and claims.list_claims(tmp_path)["mine"].owner["job"] == "4242.1"
    taken.release()


def test_a_killed_runners_claim_is_taken_over_at_once(tmp_path):
    """Same host, process gone: no need to wait for the heartbeat to age."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a runner that takes the claim, says so, and hangs until killed
        try:
            os.close(read)
            claims.try_claim(tmp_path, "dead")
            os.write(write, b"held")
            time.sleep(120)
        finally:
            os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 4) == b"held"
        assert claims.try_claim(tmp_path, "dead") is None  # alive: kept out
        assert claims.list_claims(tmp_path)["dead"].owner["pid"] == pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
    info = claims.list_claims(tmp_path)["dead"]
    assert "is gone" in info.stale()
    taken = claims.try_claim(tmp_path, "dead")
    assert taken is not None and taken.holds()
    taken.release()


@pytest.mark.parametrize("attempt", range(50))  # lost one run in ten: 50 runs catch that 99.5 % of the time
def test_only_one_of_many_racers_takes_over_a_stale_claim(tmp_path, attempt):
    _foreign_claim(tmp_path, "race", age_s=10_000)
    won, barrier = [], threading.Barrier(8)

    def racer():
        barrier.wait()
        claim = claims.try_claim(tmp_path, "race", stale_after=60)
        if claim is not None:
            won.append(claim)

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and won[0].holds()
    assert not list(claims.claims_dir(tmp_path).glob(".*"))  # no markers or temp files left behind
    won[0].release()


def test_a_claim_replaced_while_it_is_read_never_pairs_the_old_age_with_the_new_owner(tmp_path, monkeypatch):
    """The interleaving behind the double takeover: runner A replaces a stale claim by its own between
    runner C's look at the claim's age and C's read of its owner. C then saw A's fresh claim as stale (old
    age, A's token) and took it over too. Here the replacement happens at exactly that point, every time."""
    path = _foreign_claim(tmp_path, "race", age_s=10_000)
    fresh = json.dumps({"token": "t-new", "host": socket.gethostname(), "pid": os.getpid(), "started": rec.now()})
    real_stat, real_fstat, replaced = Path.stat, os.fstat, []

    def replace_once():
        if not replaced:
            replaced.append(True)
            tmp = path.with_name(".new.tmp")
            tmp.write_text(fresh)
            os.replace(tmp, path)  # runner A's takeover: one rename

    def stat(self, *args, **kwargs):
        out = real_stat(self, *args, **kwargs)
        if self == path:
            replace_once()
        return out

    def fstat(fd):
        out = real_fstat(fd)
        replace_once()
        return out

    monkeypatch.setattr(Path, "stat", stat)
    monkeypatch.setattr(os, "fstat", fstat)
    info = claims.read_claim(path)
    monkeypatch.undo()
    assert replaced
    if info.owner.get("token") == "t-new":  # A's claim: it must look as fresh as it is
        assert info.stale(60) is None, info.stale(60)
    else:  # the stale claim, read whole
        assert info.owner["token"] == "t-race" and info.age_s > 60


def _race_over(results: Path, cells: list[str], start, done, out: Path) -> None:
    """One racing process: try every stale claim, note which it won, hold them until every racer is done."""
    start.wait()
    won = [cell for cell in cells if claims.try_claim(results, cell, stale_after=60, heartbeat=3600) is not None]
    out.write_text("\n".join(won))
    done.wait()  # alive until the others finish, so a claim it won is never free to take


def test_racing_processes_take_over_each_stale_claim_exactly_once(tmp_path):
    """Processes (not threads of one process: those share a pid) race over hundreds of stale claims."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    cells = [f"c{i:03d}" for i in range(150)]
    racers = 4
    for rounds in range(2):
        results = tmp_path / f"round{rounds}"
        for cell in cells:
            _foreign_claim(results, cell, age_s=10_000)
        start, done = ctx.Barrier(racers), ctx.Barrier(racers + 1)
        outs = [tmp_path / f"won-{rounds}-{r}.txt" for r in range(racers)]
        procs = [ctx.Process(target=_race_over, args=(results, cells[::1 if r % 2 else -1], start, done, outs[r]))
                 for r in range(racers)]
        for proc in procs:
            proc.start()
        try:
            deadline = time.time() + 120
            while not all(out.exists() for out in outs) and time.time() < deadline:
                time.sleep(0.05)
            holders = {cell: [r for r, out in enumerate(outs) if cell in out.read_text().split()] for cell in cells}
            owners = {cell: info.owner["pid"] for cell, info in claims.list_claims(results).items()}
        finally:
            done.wait(timeout=30)
            for proc in procs:
                proc.join(timeout=30)
        assert all(len(h) == 1 for h in holders.values()), {c: h for c, h in holders.items() if len(h) != 1}
        assert all(owners[cell] == procs[h[0]].pid for cell, h in holders.items())
        assert not list(claims.claims_dir(results).glob(".*"))  # no markers or temp files left behind


def test_a_runner_that_lost_its_claim_drops_its_result(tmp_path):
    """A runner frozen past stale_after whose claim was taken over must not write a second record."""
    from fnabench.harness import config as cfg
    from fnabench.harness.runner import Runner, SweepSummary, cells

    (tmp_path / "s.toml").write_text(TINY_SWEEP)
    runner = Runner(cfg.override(cfg.load(tmp_path / "s.toml"), out=str(tmp_path / "r")), quiet=True,
                    log=lambda s: None)
    (tmp_path / "r").mkdir()
    summary = SweepSummary(tmp_path / "r")
    cell = cells(runner.config)[0]
    assert runner._take(cell, summary)
    path = claims.claims_dir(tmp_path / "r") / f"{cell.id}.claim"
    path.write_text(json.dumps({"token": "someone-else", "host": "other", "pid": 1}))  # taken over meanwhile
    record = {"id": cell.id, "status": "ok"}
    runner._write(record, summary)
    assert not (tmp_path / "r" / f"{cell.id}.json").exists() and summary.elsewhere == [cell.id]



def _failed(cell_id: str, finished: str, duration_s: float) -> dict:
    """A failed record of ``cell_id`` as another runner (or an earlier run) wrote it."""
    return {"schema": rec.SCHEMA_VERSION, "id": cell_id, "status": "failed", "model": "tiny:vit", "variant": "exact",
            "variant_short": "exact", "task": "fidelity:synthetic", "settings": {}, "metrics": {},
            "primary_metric": None, "higher_is_better": {}, "flops": None, "timing": None, "peak_memory_bytes": None,
            "environment": {}, "seed": 0, "started": finished, "finished": finished, "duration_s": duration_s,
            "error": "RuntimeError: boom"}


def test_a_failure_found_at_start_is_retried_and_one_written_meanwhile_is_left_alone(tmp_path):
    """Which failures are retried is decided by what the folder held when the runner started, not by clocks:
    a failure stamped in this very second, or ahead of this host's clock (another node's), is still retried;
    a failure another runner writes while this one runs is that runner's fresh attempt and is left alone."""
    from fnabench.harness import config as cfg
    from fnabench.harness.runner import Runner, cells

    (tmp_path / "s.toml").write_text(TINY_SWEEP)
    config = cfg.override(cfg.load(tmp_path / "s.toml"), out=str(tmp_path / "r"))
    out = tmp_path / "r"
    out.mkdir()
    now_cell, ahead_cell, meanwhile_cell = cells(config)
    rec.write_record(out, _failed(now_cell.id, rec.now(), 0.5))  # the same second the runner starts in
    rec.write_record(out, _failed(ahead_cell.id, "2999-01-01T00:00:00+00:00", 0.5))  # a node whose clock runs ahead
    (out / "copy").mkdir()  # an older copy of the same cell's record in a subfolder changes nothing
    rec.write_record(out / "copy", _failed(now_cell.id, "2000-01-01T00:00:00+00:00", 9.0))
    late = _failed(meanwhile_cell.id, rec.now(), 0.25)

    class Racing(Runner):
        def _load(self, name, size):  # while this runner loads its model, another one fails a cell
            rec.write_record(out, late)
            return super()._load(name, size)

    summary = Racing(config, quiet=True, log=lambda s: None).run()
    assert sorted(summary.ran) == sorted([now_cell.id, ahead_cell.id]) and summary.elsewhere == [meanwhile_cell.id]
    assert all(rec.read_records(out / f"{c.id}.json")[0]["status"] == "ok" for c in (now_cell, ahead_cell))
    assert rec.read_records(out / f"{meanwhile_cell.id}.json")[0] == late  # the other runner's record stands
    assert claims.list_claims(out) == {}
    # the next run finds that failure at its start, so it retries it
    assert Runner(config, quiet=True, log=lambda s: None).run().ran == [meanwhile_cell.id]


SIX_VARIANTS = TINY_SWEEP.replace('variants = ["fna:m=4,layers=-2:", "exact", "nystrom:m=4"]',
                                  'variants = ["exact", "fna:m=4", "fna:m=6", "fna:m=8", "nystrom:m=4", "nystrom:m=8", '
                                  '"fna:m=4,landmarks=random", "mask:tokens=all"]')
# cells slow enough (paired timing rounds) that the runner which imports second still finds cells to claim
RACING_SWEEP = SIX_VARIANTS.replace("timing_repeats = 1", "timing_repeats = 150")


@pytest.mark.slow
def test_two_concurrent_runners_share_a_sweep_without_running_a_cell_twice(tmp_path):
    """Two `fnabench run` processes started together on one results folder: each cell runs once, all records valid."""
    assert SIX_VARIANTS != TINY_SWEEP and RACING_SWEEP != SIX_VARIANTS
    (tmp_path / "sweep.toml").write_text(RACING_SWEEP)
    cmd = [sys.executable, "-m", "fnabench.cli.main", "run", "sweep.toml", "--out", "shared", "--quiet"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**_env(), "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    ran = [int(re.search(r"(\d+) cells run", o).group(1)) for o, _ in outs]
    records = rec.read_records(tmp_path / "shared")
    assert len(records) == 8 and len({r["id"] for r in records}) == 8 and all(r["status"] == "ok" for r in records)
    assert sum(ran) == 8, f"cells run by the two runners: {ran} (a cell ran twice, or none ran it)"
    assert all(n > 0 for n in ran), f"one runner did everything ({ran}): the race was not exercised"
    assert claims.list_claims(tmp_path / "shared") == {}  # every claim released
