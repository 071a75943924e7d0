"""Claim files: one per cell being run, so runners sharing a results folder never run a cell twice.

A runner takes a cell by creating ``RESULTS/.claims/<cell id>.claim`` (written to a temp file, then
hard-linked into place: the link fails if the claim exists, and a claim is never seen half-written);
it keeps the claim fresh with a heartbeat (the file's mtime, touched every ``HEARTBEAT_S`` seconds by
a thread), writes the cell's record, then removes the claim. Plain files and ``link`` work on the
shared file systems of clusters (NFS, Lustre, GPFS), where ``flock`` may be local to one node.

A claim is *stale*, and the next runner takes it over, when its process is gone (same host, pid
dead or reused), when it was made by an earlier run of the same SLURM job and task (requeued after a
time-out or preemption), or when its heartbeat is older than ``stale_after`` seconds (another host: a
dead node, a killed job). Taking over is serialised per stale claim by an exclusive marker file, and replaces the
claim in one rename, so two runners that find the same stale claim never both take it. A runner
checks that it still holds its claim before writing the record: one that was frozen for longer than
``stale_after`` (and lost its claim) drops its result instead of writing a second record.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fnabench.harness.records import now

CLAIMS_DIR = ".claims"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


def claims_dir(results: str | os.PathLike) -> Path:
    return Path(results) / CLAIMS_DIR


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return start is None or _process_start(pid) in (None, start)


def job_key() -> str | None:
    """This process's SLURM job (array task) and task rank, e.g. ``4242_3.0``; None outside SLURM."""
    env = os.environ
    job = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID')}" if env.get("SLURM_ARRAY_JOB_ID") \
        else env.get("SLURM_JOB_ID")
    return f"{job}.{env.get('SLURM_PROCID', '0')}" if job else None


def _owner() -> dict[str, Any]:
    pid = os.getpid()
    return {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid),
            "job": job_key(), "started": now(), "heartbeat_s": HEARTBEAT_S}


@dataclass(frozen=True)
class ClaimInfo:
    """What a claim file says about its owner, and how old its heartbeat is."""

    cell_id: str
    owner: dict[str, Any]
    age_s: float  # seconds since the last heartbeat

    def stale(self, stale_after: float = STALE_AFTER_S) -> str | None:
        """Why the claim is stale (its owner is gone), or None while it is live."""
        host, pid = self.owner.get("host"), self.owner.get("pid")
        here = host == socket.gethostname()
        if here and isinstance(pid, int) and not _alive(pid, self.owner.get("pid_start")):
            return f"process {pid} on {host} is gone"
        job = self.owner.get("job")
        if job and job == job_key() and not (here and pid == os.getpid()):
            return f"it is from an earlier run of this SLURM job ({job}), which was requeued"
        if self.age_s > stale_after:
            return f"no heartbeat for {self.age_s:.0f} s (stale after {stale_after:.0f} s)"
        return None

    def where(self) -> str:
        job = f", job {self.owner['job']}" if self.owner.get("job") else ""
        return f"{self.owner.get('host', '?')} pid {self.owner.get('pid', '?')}{job}"


def read_claim(path: Path) -> ClaimInfo | None:
    """The claim at ``path``, or None if there is none (or it vanished while being read)."""
    # the age and the owner come from one open file: a claim replaced between a stat() of the path and a
    # read of it would pair the old claim's age with the new owner, and a fresh claim would look stale
    try:
        with open(path, "rb") as f:
            age = time.time() - os.fstat(f.fileno()).st_mtime
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
    except ValueError:  # unreadable: treat it as an owner we cannot identify, judged by age alone
        owner = {}
    return ClaimInfo(path.name.split(".")[0], owner if isinstance(owner, dict) else {}, max(age, 0.0))


def list_claims(results: str | os.PathLike) -> dict[str, ClaimInfo]:
    """Every claim in a results folder, by cell id."""
    folder = claims_dir(results)
    if not folder.is_dir():
        return {}
    out = {}
    for path in folder.glob("*.claim"):
        info = read_claim(path)
        if info is not None:
            out[info.cell_id] = info
    return out


class Claim:
    """A held claim on one cell: a heartbeat thread keeps it live until :meth:`release`."""

    def __init__(self, path: Path, owner: dict[str, Any], heartbeat: float) -> None:
        self.path, self.owner, self.token = path, owner, owner["token"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat,), daemon=True,
                                        name=f"fnabench-claim-{path.stem}")
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            if self.holds():
                try:
                    os.utime(self.path)
                except FileNotFoundError:
                    return

    def holds(self) -> bool:
        """Whether the claim file is still this claim (a runner frozen past ``stale_after`` may have lost it)."""
        try:
            return json.loads(self.path.read_text()).get("token") == self.token
        except (OSError, ValueError, AttributeError):
            return False

    def release(self) -> None:
        """Stop the heartbeat and remove the claim, if it is still ours."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.holds():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _write_temp(folder: Path, owner: dict[str, Any]) -> Path:
    tmp = folder / f".{owner['token']}.tmp"
    with open(tmp, "w") as f:
        json.dump(owner, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def try_claim(results: str | os.PathLike, cell_id: str, *, stale_after: float = STALE_AFTER_S,
              heartbeat: float = HEARTBEAT_S, label: str | None = None) -> Claim | None:
    """Take the claim on ``cell_id`` in ``results``: a :class:`Claim`, or None while a live runner holds it.

    ``label`` (what the cell is, in words) is kept in the claim for ``fnabench status``.

    A stale claim is taken over (module docstring). The caller must still check that the cell was not
    finished meanwhile (its record written and the claim released just before this call).
    """
    folder = claims_dir(results)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cell_id}.claim"
    for _ in range(5):  # a claim that vanishes between our looks is retried, a few times
        owner = {**_owner(), "cell": cell_id, "label": label, "heartbeat_s": heartbeat}
        tmp = _write_temp(folder, owner)
        try:
            try:
                os.link(tmp, path)
                return Claim(path, owner, heartbeat)
            except FileExistsError:
                pass
            current = read_claim(path)
            if current is None:
                continue  # released meanwhile: try again
            if current.stale(stale_after) is None:
                return None
            if _take_over(folder, path, current, tmp, stale_after):
                return Claim(path, owner, heartbeat)
            if read_claim(path) is not None:
                return None  # another runner took it over
        finally:
            tmp.unlink(missing_ok=True)
    return None


def _take_over(folder: Path, path: Path, stale: ClaimInfo, tmp: Path, stale_after: float) -> bool:
    """Replace the stale claim ``stale`` by ours (``tmp``); False if another runner is doing it."""
    token = str(stale.owner.get("token", "unreadable"))
    marker = folder / f".{stale.cell_id}.takeover-{token}"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        # a runner died between creating the marker and replacing the claim: the marker itself goes stale
        try:
            if time.time() - marker.stat().st_mtime > HEARTBEAT_S:
                marker.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        return False
    os.close(fd)
    try:
        again = read_claim(path)
        if again is None or again.owner.get("token") != stale.owner.get("token") or again.stale(stale_after) is None:
            return False  # released, replaced or alive again (a heartbeat) since we looked
        os.replace(tmp, path)  # one rename: the claim never disappears while it changes hands
        return True
    finally:
        marker.unlink(missing_ok=True)
