"""Bad input, as a newcomer types it: every command answers a mistake with one line on stderr and exit 2,
before any work and without changing anything already written (results, baselines, leaderboards)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_SWEEP

from fnabench.cli.main import main

pytest.importorskip("timm")

SWEEP = TINY_SWEEP

#: (name, TOML lines added to SWEEP or replacing its keys, expected fragment of the one line)
BAD_CONFIGS = [
    ("unknown key", "bogus = 1", "unknown config key 'bogus'; accepted:"),
    ("string for a boolean", 'offline = "yes"', "'offline' = 'yes' is a str; accepted: true or false"),
    ("string for an integer", 'batch_size = "8"', "'batch_size' = '8' is a str; accepted: an integer >= 1"),
    ("unknown task suffix", 'tasks = ["fidelity:synth"]', "unknown fidelity source 'synth'; accepted: fidelity:images"),
    ("unknown task", 'tasks = ["segment:ade"]', "unknown task 'segment:ade'; accepted:"),
    ("negative task option", 'tasks = ["knn:digits"]\n[task_options."knn:digits"]\nk = -3',
     "knn:digits: option k = -3 is not accepted; accepted: an integer >= 1"),
    ("misspelt task option", 'tasks = ["knn:digits"]\n[task_options."knn:digits"]\nkk = 3',
     "knn:digits: unknown option(s) 'kk'; accepted: cache_mb, k, limit,"),
    ("option of the wrong type", 'tasks = ["knn:digits"]\n[task_options."knn:digits"]\ntemperature = "hot"',
     "option temperature = 'hot' is not accepted; accepted: a number > 0"),
    ("folder task without root", 'tasks = ["knn:folder"]', "knn:folder needs option root"),
    ("folder task, missing root", 'tasks = ["linear:folder"]\n[task_options."linear:folder"]\nroot = "/no/such/dir"',
     "option root = '/no/such/dir' is not accepted; accepted: an existing directory"),
    ("options for a task not swept", '[task_options."knn:digits"]\nk = 3', "must name a task of this sweep"),
    ("no variants", "variants = []", "no variants"),
    ("no models", "models = []", "no models"),
    ("unknown model", 'models = ["nope:x"]', "unknown model 'nope:x'; accepted:"),
    ("unknown offline model", 'models = ["offline:dinov2-xl"]', "unknown offline model 'dinov2-xl'"),
    ("image size below the patch", "image_sizes = [8]", "tiny:vit cannot take 8x8 px images"),
    ("layers past the depth", 'variants = ["exact", "fna:m=8,layers=50"]',
     "layers=50 selects no block (image tower: 6 blocks)"),
    ("mask layers past the depth", 'variants = ["mask:layers=-9"]', "layers=-9 selects no block"),
    ("text tower of a vision model", 'variants = ["fna:m=4,tower=text"]', "tower=image|all"),
    ("bad variant value", 'variants = ["fna:m=0"]', "bad value '0'"),
    ("unknown variant key", 'variants = ["fna:q=3"]', "unknown key 'q' for 'fna'"),
    ("unknown dtype", 'dtype = "int8"', "unknown dtype 'int8'; accepted: float32"),
    ("unknown device", 'device = "tpu"', "unknown device 'tpu'; accepted: cpu, cuda, cuda:N"),
    ("zero repeats", "timing_repeats = 0", "timing_repeats must be an integer >= 1"),
    ("invalid TOML", 'models = ["tiny:vit"', "invalid TOML"),
    ("bad recall seed", 'models = ["recall:smoke@seedX"]\ntasks = ["recall:none"]', "bad seed 'seedX'"),
    ("unknown recall preset", 'models = ["recall:nope"]\ntasks = ["recall:none"]',
     "neither a run folder nor a preset"),
    ("unknown table metric", 'table_metrics = ["top1", 3]', "'table_metrics': 3 is not a str"),
    # the [executor] table (fnabench.harness.executor)
    ("executor not a table", 'executor = "slurm"', "'executor' = 'slurm' is a str; accepted: a table"),
    ("unknown executor key", '[executor]\nqueue = "gpu"', "unknown [executor] key 'queue'; accepted: kind"),
    ("unknown executor kind", '[executor]\nkind = "k8s"', "kind = 'k8s' is not accepted; accepted: one of"),
    ("negative cells per job", "[executor]\ncells_per_job = -1", "cells_per_job = -1 is not accepted; accepted:"),
    ("string for gpus per job", '[executor]\ngpus_per_job = "2"', "gpus_per_job = '2' is not accepted"),
    ("zero time limit", "[executor]\ntime_min = 0", "time_min = 0 is not accepted; accepted: an integer >= 1"),
    ("setup not a list", '[executor]\nsetup = "module load cuda"', "setup = 'module load cuda' is not"),
    ("empty partition", '[executor]\npartition = " "', "partition = ' ' is not accepted; accepted: a SLURM partition"),
    ("number for an account", "[executor]\naccount = 7", "account = 7 is not accepted; accepted: a SLURM account"),
    ("number for a qos", "[executor]\nqos = 1", "qos = 1 is not accepted; accepted: a SLURM QOS"),
    ("list for a constraint", '[executor]\nconstraint = ["a100"]', "constraint = ['a100'] is not accepted"),
    ("zero cpus per job", "[executor]\ncpus_per_job = 0", "cpus_per_job = 0 is not accepted; accepted: an integer"),
    ("zero memory", "[executor]\nmem_gb = 0", "mem_gb = 0 is not accepted; accepted: a number of GB > 0"),
    ("zero array parallelism", "[executor]\narray_parallelism = 0", "array_parallelism = 0 is not accepted"),
    ("number for a log dir", "[executor]\nlog_dir = 1", "log_dir = 1 is not accepted; accepted: a folder path"),
    ("string for wait", '[executor]\nwait = "yes"', "wait = 'yes' is not accepted; accepted: true or false"),
    ("negative requeues", "[executor]\nmax_requeues = -1", "max_requeues = -1 is not accepted; accepted: an"),
    ("zero staleness", "[executor]\nstale_after_s = 0", "stale_after_s = 0 is not accepted; accepted: a number"),
    ("boolean sbatch option", '[executor]\nsbatch = {exclusive = true}', "sbatch = {'exclusive': True} is not"),
]


def _config(extra: str) -> str:
    """SWEEP with the keys that ``extra`` sets replaced (top-level keys only), then ``extra``."""
    keys = {line.split("=")[0].strip() for line in extra.splitlines() if "=" in line and not line.startswith("[")}
    kept = [line for line in SWEEP.strip().splitlines() if line.split("=")[0].strip() not in keys]
    return "\n".join(kept) + "\n" + extra + "\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A results folder, its baseline and leaderboard, and the odd files a newcomer points commands at."""
    ws = tmp_path_factory.mktemp("ws")
    (ws / "sweep.toml").write_text(SWEEP)
    assert main(["run", str(ws / "sweep.toml"), "--out", str(ws / "results"), "--quiet"]) == 0
    assert main(["baseline", str(ws / "results"), "-o", str(ws / "base.json")]) == 0
    assert main(["publish", str(ws / "results"), str(ws / "lb")]) == 0
    (ws / "afile.txt").write_text("not a folder\n")
    (ws / "bad.json").write_text("{not json")
    (ws / "empty").mkdir()
    (ws / "bogus.toml").write_text(SWEEP + "bogus = 1\n")
    (ws / "tuned").mkdir()  # a tune of other settings lives here
    from fnabench.harness.tune import TuneSpec, validate

    (ws / "tuned" / "tune.toml").write_text(validate(TuneSpec("tiny:vit", "knn:digits", blocks=["all"])).to_toml())
    record = next((ws / "results").glob("*.json"))
    shutil.copyfile(record, ws / "record.json")  # a record where a baseline is expected
    for name, extra, _ in BAD_CONFIGS:
        (ws / f"{name.replace(' ', '_').replace(',', '')}.toml").write_text(_config(extra))
    return ws


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its content hash and mode: what a bad command must leave alone."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(root))] = (digest, st.st_mode, st.st_mtime_ns if p.is_file() else None)
    return out


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_exit_2(argv: list[str], fragment: str, ws: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(ws)  # default paths (results/<name>) would land here, where the snapshot sees them
    before = _snapshot(ws)
    code, _, err = _run(argv, capsys)
    assert code == 2, f"{argv}: exit {code}, stderr {err!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fnabench"), f"{argv}: not one line: {err!r}"
    assert "Traceback" not in err and fragment in lines[0], f"{argv}: {lines[0]!r} lacks {fragment!r}"
    assert _snapshot(ws) == before, f"{argv}: changed files in the workspace"


@pytest.mark.parametrize("name, extra, fragment", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_sweep_config_is_one_line_before_any_work(name, extra, fragment, workspace, capsys, monkeypatch):
    config = f"{name.replace(' ', '_').replace(',', '')}.toml"
    _assert_one_line_exit_2(["run", config, "--out", "results", "--quiet"], fragment, workspace, capsys, monkeypatch)


COMMANDS = [
    # run: flags and paths
    (["run", "missing.toml"], "config file 'missing.toml' not found"),
    (["run", "sweep.toml", "--out", "results", "--format", "pdf"], "invalid choice: 'pdf'"),
    (["run", "sweep.toml", "--out", "afile.txt"], "results folder 'afile.txt' is a file"),
    (["run", "sweep.toml", "--out", "no/such/results"], "neither 'no/such' nor its parent exists"),
    (["run", "sweep.toml", "--out", "results", "--limit", "0"], "limit must be an integer >= 1"),
    (["run", "sweep.toml", "--out", "results", "--batch-size", "0"], "batch_size must be an integer >= 1"),
    (["run", "sweep.toml", "--out", "results", "--image-size", "4"], "image size 4 is too small"),
    (["run", "sweep.toml", "--out", "results", "--dtype", "int8"], "invalid choice: 'int8'"),
    (["run", "sweep.toml", "--out", "results", "--variants", "fna:m=8,layers=50"], "selects no block"),
    (["run", "sweep.toml", "--out", "results", "--tasks", "fidelity:synth"], "unknown fidelity source"),
    (["run", "sweep.toml", "--out", "results", "--batch-size", "many"], "invalid int value: 'many'"),
    (["run", "sweep.toml", "--out", "results", "--executor", "k8s"], "invalid choice: 'k8s'"),
    (["run", "sweep.toml", "--out", "results", "--executor", "slurm"], "sbatch/srun not found on PATH"),
    (["run", "sweep.toml", "--out", "results", "--wait", "--no-wait"], "not allowed with argument --wait"),
    # status
    (["status", "missing"], "no results at 'missing'"),
    (["status", "afile.txt"], "no results at 'afile.txt'"),
    (["status", "results", "missing.toml"], "config file 'missing.toml' not found"),
    (["status", "results", "bogus.toml"], "unknown config key 'bogus'"),
    # tune: every flag checked before any cell runs (model loads at most, to check --blocks against its depth)
    (["tune", "nope:x", "knn:digits"], "unknown model 'nope:x'; accepted:"),
    (["tune", "tiny:vit", "knn:nope"], "unknown knn dataset 'nope'"),
    (["tune", "tiny:vit", "knn:digits", "--budget", "-1"], "--budget -1.0: accepted: a number >= 0"),
    (["tune", "tiny:vit", "knn:digits", "--budget", "nan"], "--budget nan: accepted: a number >= 0"),
    (["tune", "tiny:vit", "knn:digits", "--max-cells", "1"], "--max-cells 1: accepted: an integer >= 2"),
    (["tune", "tiny:vit", "knn:digits", "--m", "0,16"], "--m 0,16: accepted: integers >= 1"),
    (["tune", "tiny:vit", "knn:digits", "--m", "a"], "--m 'a': accepted: comma-separated integers"),
    (["tune", "tiny:vit", "knn:digits", "--landmarks", "kmeans"], "--landmarks 'kmeans': accepted: fps, random, norm"),
    (["tune", "tiny:vit", "knn:digits", "--pinv", "svd"], "--pinv 'svd': accepted: ridge, newton, exact"),
    (["tune", "tiny:vit", "knn:digits", "--blocks", "all,0"], "--blocks '0': accepted: 'all' or a number >= 1"),
    (["tune", "tiny:vit", "knn:digits", "--blocks", "20", "--out", "t1"], "--blocks 20: tiny:vit has 6 blocks"),
    (["tune", "tiny:vit", "knn:digits", "--task-option", "k=-3"], "knn:digits: option k = -3 is not accepted"),
    (["tune", "tiny:vit", "knn:digits", "--task-option", "kk"], "--task-option 'kk': accepted: KEY=VALUE"),
    (["tune", "tiny:vit", "knn:digits", "--proxy", "fidelity:synth"], "unknown fidelity source 'synth'"),
    (["tune", "tiny:vit", "knn:digits", "--proxy", "knn:digits"], "is the task itself; accepted: a cheaper task"),
    (["tune", "tiny:vit", "knn:digits", "--proxy-images", "0"], "--proxy-images 0: accepted: an integer >= 1"),
    (["tune", "tiny:vit", "knn:digits", "--default", "fna:q=1"], "--default: unknown key 'q' for 'fna'"),
    (["tune", "tiny:vit", "knn:digits", "--image-size", "4"], "image size 4 is too small"),
    (["tune", "tiny:vit", "knn:digits", "--threads", "0"], "--threads 0: accepted: an integer >= 1"),
    (["tune", "tiny:vit", "knn:digits", "--pinv", ","], "--pinv '': accepted: ridge, newton, exact"),
    (["tune", "tiny:vit", "knn:digits", "--limit", "0"], "limit must be an integer >= 1, got 0"),
    (["tune", "tiny:vit", "knn:digits", "--batch-size", "0"], "batch_size must be an integer >= 1, got 0"),
    (["tune", "tiny:vit", "knn:digits", "--device", "tpu"], "unknown device 'tpu'; accepted: cpu, cuda, cuda:N"),
    (["tune", "tiny:vit", "knn:digits", "--dtype", "fp8"], "unknown dtype 'fp8'; accepted: float32"),
    (["tune", "tiny:vit", "knn:digits", "--timing-repeats", "0"], "timing_repeats must be an integer >= 1, got 0"),
    (["tune", "tiny:vit", "knn:digits", "--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
    (["tune", "tiny:vit"], "the following arguments are required: task"),
    (["status"], "the following arguments are required: results"),
    (["tune", "tiny:vit", "knn:digits", "--out", "afile.txt"], "results folder 'afile.txt' is a file"),
    (["tune", "tiny:vit", "knn:digits", "--budget", "2", "--out", "tuned"],
     "tuned holds a tune with other settings (budget = 1.0); accepted: the same settings"),
    # leaderboard
    (["leaderboard", "missing"], "no results at 'missing'"),
    (["leaderboard", "empty"], "no records under 'empty'"),
    (["leaderboard", "results", "--format", "pdf"], "invalid choice: 'pdf'"),
    (["leaderboard", "results", "-o", "no/such/table.md"], "neither 'no/such' nor its parent exists"),
    (["leaderboard", "results", "-o", "results"], "--output 'results' is a folder"),
    (["leaderboard", "results", "--plot", "afile.txt/plot"], "'afile.txt' is a file, not a folder"),
    (["leaderboard", "bad.json"], "bad.json: not valid JSON"),
    (["leaderboard"], "the following arguments are required: results"),
    # publish
    (["publish", "empty", "lb2"], "no records under 'empty'"),
    (["publish", "results", "afile.txt"], "leaderboard folder 'afile.txt' is a file"),
    (["publish", "missing", "lb3"], "no results at 'missing'"),
    (["publish", "results", "no/such/lb"], "neither 'no/such' nor its parent exists"),
    # baseline
    (["baseline", "empty", "-o", "b2.json"], "no records under 'empty'"),
    (["baseline", "results", "-o", "b2.json", "--tolerance", "bogus=0.1"], "unknown metric(s) 'bogus'"),
    (["baseline", "results", "-o", "b2.json", "--tolerance", "cos_sim=-1"], "must be a non-negative number"),
    (["baseline", "results", "-o", "b2.json", "--tolerance", "cos_sim"], "expected METRIC=VALUE"),
    (["baseline", "results", "-o", "b2.json", "--speed-tolerance", "-0.5"], "must be a non-negative number"),
    (["baseline", "results", "-o", "results"], "--output 'results' is a folder"),
    (["baseline", "results", "-o", "no/such/b.json"], "neither 'no/such' nor its parent exists"),
    (["baseline", "results"], "the following arguments are required: -o/--output"),
    # check
    (["check", "results", "--baseline", "missing.json"], "no baseline at missing.json"),
    (["check", "results", "--baseline", "bad.json"], "bad.json: not valid JSON"),
    (["check", "results", "--baseline", "record.json"], "not a usable fnabench baseline"),
    (["check", "results", "--baseline", "afile.txt"], "afile.txt: not valid JSON"),
    (["check", "missing", "--baseline", "base.json"], "no results at 'missing'"),
    (["check", "empty", "--baseline", "base.json"], "no records under 'empty'"),
    # list and the command itself
    (["list", "widgets"], "invalid choice: 'widgets'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required"),
    # recall
    (["recall", "train", "--preset", "nope"], "invalid choice: 'nope'"),
    (["recall", "train", "--set", "bogus", "--out", "r1"], "--set takes SECTION.KEY=VALUE"),
    (["recall", "train", "--set", "train.bogus=1", "--out", "r1"], "unknown key train.bogus"),
    (["recall", "train", "--preset", "cpu", "--set", "train.lr=abc", "--out", "r1"], "bad value for train.lr"),
    (["recall", "eval", "missing"], "missing is not a recall run directory"),
    (["recall", "report", "empty", "--out-dir", "r2"], "empty is not a recall run directory"),
    (["recall", "icl", "--task", "nope.json", "--out", "r3"], "task file not found: nope.json"),
    (["recall", "throughput", "huge"], "invalid choice: 'huge'"),
]


@pytest.mark.parametrize("argv, fragment", COMMANDS, ids=[" ".join(a[:4]) or "(none)" for a, _ in COMMANDS])
def test_bad_command_is_one_line_exit_2_and_changes_nothing(argv, fragment, workspace, capsys, monkeypatch,
                                                            tmp_path):
    if "sbatch/srun not found" in fragment:  # the environment this case states: a PATH without SLURM's commands
        monkeypatch.setenv("PATH", str(tmp_path))
    _assert_one_line_exit_2(argv, fragment, workspace, capsys, monkeypatch)


def test_cuda_asked_for_on_a_machine_without_it(workspace, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _assert_one_line_exit_2(["run", "sweep.toml", "--out", "results", "--device", "cuda"],
                            "torch sees no CUDA GPU here", workspace, capsys, monkeypatch)


def test_the_matrix_is_large():
    assert len(BAD_CONFIGS) + len(COMMANDS) >= 40


def test_leaderboard_into_a_closed_pipe_is_quiet(workspace):
    """`fnabench leaderboard ... | head -1`: no BrokenPipeError traceback."""
    cmd = f"{sys.executable} -m fnabench.cli.main leaderboard {workspace / 'results'} --format csv | head -c 1"
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert proc.stdout == "t" and "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr


def test_exit_codes_tell_a_regression_from_a_mistake(workspace, tmp_path, capsys, monkeypatch):
    """check: 0 when nothing moved, 1 for a real regression, 2 for a broken invocation."""
    results = tmp_path / "results"
    shutil.copytree(workspace / "results", results)
    assert _run(["check", str(results), "--baseline", str(workspace / "base.json")], capsys)[0] == 0
    victim = next(p for p in results.glob("*.json") if json.loads(p.read_text())["variant"].startswith("fna"))
    record = json.loads(victim.read_text())
    record["metrics"]["cos_sim"] -= 0.5
    victim.write_text(json.dumps(record))
    code, out, _ = _run(["check", str(results), "--baseline", str(workspace / "base.json")], capsys)
    assert code == 1 and "metric cos_sim" in out
    assert _run(["check", str(results), "--baseline", str(tmp_path / "none.json")], capsys)[0] == 2


def test_a_bug_is_a_traceback_and_exit_3(workspace, capsys, monkeypatch):
    import fnabench.cli.main as cli

    monkeypatch.setitem(cli.COMMANDS, "list", lambda args: 1 / 0)
    code, _, err = _run(["list", "models"], capsys)
    assert code == 3 and "Traceback" in err and "ZeroDivisionError" in err and "internal error" in err


def test_written_files_are_readable_by_others(workspace):
    """Records and baselines get the mode a plain open() gives (0644 under the usual umask), not mkstemp's 0600."""
    for path in [*(workspace / "results").glob("*.json"), workspace / "base.json", workspace / "lb" / "README.md"]:
        assert path.stat().st_mode & 0o044 == 0o044, path


def test_one_missing_folder_level_is_made_for_outputs(workspace, tmp_path, capsys):
    """`-o baselines/x.json` in a fresh clone works (one level made); `-o a/b/x.json` with neither is refused."""
    out = tmp_path / "baselines" / "x.json"
    assert _run(["baseline", str(workspace / "results"), "-o", str(out)], capsys)[0] == 0 and out.is_file()
    assert _run(["leaderboard", str(workspace / "results"), "-o", str(tmp_path / "a" / "b" / "t.md")], capsys)[0] == 2
    assert not (tmp_path / "a").exists()


def test_unreadable_paths_are_one_line_and_other_os_errors_are_bugs(capsys, monkeypatch):
    import fnabench.cli.main as cli

    monkeypatch.setitem(cli.COMMANDS, "list", lambda args: Path("/no/such/file").read_text())
    code, _, err = _run(["list", "models"], capsys)
    assert code == 2 and err.strip() == "fnabench: error: /no/such/file: No such file or directory"

    def disk_full(args):
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(cli.COMMANDS, "list", disk_full)
    code, _, err = _run(["list", "models"], capsys)
    assert code == 3 and "Traceback" in err and "No space left" in err
