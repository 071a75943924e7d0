"""A multi-seed recall board: each record says whether its run is finished, every cross-seed summary (emergence
spread, OOD and patching medians, the circuits' spread) covers the finished runs only and says how many, the
tables come back from the records alone, and ``report`` draws every run's k = 1 / k = 2 curves on one figure."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch

from fnabench.cli import recall_cmd as recall_cli
from fnabench.cli.main import main
from fnabench.harness.records import read_records
from fnabench.tasks.recall.interventions import patch_run
from fnabench.tasks.recall.prune import PruneSettings, prune_run
from fnabench.tasks.recall.run_results import runs_from_records
from fnabench.tasks.recall.tables import REPORT_FILES, _num, report_files

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

TINY = ["--set=train.steps=20", "--set=train.checkpoint_every=10", "--set=data.train_systems=100",
        "--set=eval.examples=2", "--set=eval.traces=4"]
PRUNE = PruneSettings(sparsity=0.5, steps=10, examples=2, traces=4, test_examples=2, test_traces=4, batch=8)
TABLES = (*REPORT_FILES, "patching.md", "circuits.md")


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """Three tiny smoke runs of 20 steps, seed 2 stopped at step 10; each patched and pruned, then reported."""
    root = tmp_path_factory.mktemp("seeds")
    previous = torch.get_num_threads()
    runs = []
    try:
        for seed, until in ((0, None), (1, None), (2, 10)):
            out = root / "runs" / f"s{seed}"
            argv = ["train", "--preset", "smoke", *TINY, "--seed", str(seed), "--out", str(out), "--threads", "1",
                    "--quiet"] + (["--until-step", str(until)] if until else [])
            assert recall_cli.main(argv) == 0
            patch_run(out, examples=2, traces=4)  # report reads these back instead of patching at 16 x 64
            for target in ("k1", "k2"):
                prune_run(out, target, PRUNE)
            runs.append(str(out))
        folder = root / "board"
        assert main(["recall", "report", *runs, "--results", str(root / "results"), "--out-dir", str(folder),
                     "--threads", "1", "--quiet"]) == 0
    finally:
        torch.set_num_threads(previous)
    return folder


def _tables(folder) -> dict[str, str]:
    return {name: (folder / name).read_text() for name in TABLES}


def test_every_record_says_whether_its_run_is_finished(board):
    records = read_records(board / "records")
    kinds = {r["task"].split(",")[1].split("=")[0] if "," in r["task"] else "curve" for r in records}
    assert kinds == {"curve", "probe", "patch", "circuit"}
    for record in records:
        assert len(record["recall"]["weights_sha256"]) == 64  # the checkpoint it scored, by its hash
        seed = record["recall"]["train_seed"]
        want = (False, 10) if seed == 2 else (True, 20)
        assert (record["recall"]["finished"], record["recall"]["steps_done"]) == want, record["task"]
        assert record["recall"]["steps_planned"] == 20


def test_summaries_are_over_the_finished_seeds_and_say_so(board, capsys):
    made = _tables(board)
    emergence = made["emergence.md"]
    assert "| **spread** over 2 finished seeds of 3 (min / median / max) |" in emergence
    assert "80 (unfinished: step 10 of 20)" in emergence and "**Unfinished:** smoke seed 2 stopped" in emergence
    assert "It is left out of the spread row, which is over the 2 finished seeds of 3." in emergence
    ood = made["ood.md"]
    assert "(step 20); median over 2 finished seeds of 3 (unfinished, not summarised: smoke seed 2)" in ood
    records = read_records(board / "records")
    plain = {r["recall"]["train_seed"]: r["metrics"]["err_k1"] for r in records if r["task"] == "recall:h2"}
    cell = ood.split("| recall query (in distribution) | ")[1].split(" |")[0]
    assert cell == f"{_num(statistics.median([plain[0], plain[1]]))} [{_num(min(plain[0], plain[1]))}–" \
                   f"{_num(max(plain[0], plain[1]))}]"  # seed 2 is not in the median
    patching = made["patching.md"]
    assert "— median over 2 finished seeds of 3 [min–max]; unfinished, in the per-run tables only: smoke seed 2" \
        in patching and "### smoke seed 2 (unfinished: step 10 of 20)" in patching
    circuits = made["circuits.md"]
    assert "| smoke seed 2 (unfinished: step 10 of 20) | k1 (recall; label swapped) |" in circuits
    for seed in (0, 1):
        assert f"| smoke seed {seed} | 46 | 46 | 46 | 1 | 1 |" in circuits
    assert "| **spread** over 2 finished seeds of 3 (min / median / max) | 46 / 46 / 46 |" in circuits
    assert "**Unfinished:** smoke seed 2; listed above, not summarised." in circuits


def test_from_records_rebuilds_the_same_tables_and_figures(board, tmp_path):
    again = tmp_path / "again"
    assert main(["recall", "report", "--from-records", str(board / "records"), "--out-dir", str(again)]) == 0
    assert _tables(again) == _tables(board)
    assert report_files(runs_from_records(read_records(board / "records"))) == _tables(board)
    for name in ("emergence.png", "dynamics.png"):  # drawn from the curves the records hold
        assert (again / name).read_bytes().startswith(b"\x89PNG")
    curves = {r["recall"]["train_seed"]: r["recall"]["curve"] for r in read_records(board / "records")
              if r["task"] == "recall:h2" and r["recall"]["emergence"] is not None}
    assert sorted(curves) == [0, 1, 2]
    for seed, curve in curves.items():  # every checkpoint of the run, each k's median with its quartiles
        assert curve["steps"] == ([0, 10] if seed == 2 else [0, 10, 20])
        assert len(curve["model"]["1"]["median"]) == len(curve["steps"]) == len(curve["examples"])
        assert curve["zero"]["1"]["median"] > 0


def test_report_draws_every_seed_on_one_emergence_figure(board):
    png = (board / "emergence.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert "[emergence.png](emergence.png)" in (board / "README.md").read_text()


def test_the_summaries_read_the_flag_from_the_records(board):
    records = read_records(board / "records")
    one = copy.deepcopy(records)
    for record in one:  # seed 1 marked unfinished in its records alone: its steps still say 20 of 20
        if record["recall"]["train_seed"] == 1:
            record["recall"]["finished"] = False
    made = report_files(runs_from_records(one))
    assert "median over 1 finished seed of 3 (unfinished, not summarised: smoke seed 1, smoke seed 2)" in \
        made["ood.md"]
    assert "**spread**" not in made["emergence.md"] and "with 1 finished seed of 3 there is no spread row" in \
        made["emergence.md"]
    assert "— 1 finished seed of 3 (smoke seed 0); unfinished" in made["patching.md"]
    none = copy.deepcopy(records)
    for record in none:
        record["recall"]["finished"] = False
    made = report_files(runs_from_records(none))
    assert "median over 3 seeds, none finished [min–max]" in made["ood.md"]
    assert "| **spread** over 3 seeds, none finished (min / median / max) |" in made["emergence.md"]
    # records made before the flag was kept: the curve's step against the configured steps decides
    legacy = copy.deepcopy(records)
    for record in legacy:
        for key in ("finished", "steps_done", "steps_planned"):
            del record["recall"][key]
    assert report_files(runs_from_records(legacy)) == report_files(runs_from_records(records))


def test_circuits_list_each_seed_and_the_spread_of_edges_recovery_and_overlap(board):
    records = copy.deepcopy(read_records(board / "records"))
    for record in records:  # seed 1's continuation circuit keeps half of the edges
        circuit = record["recall"].get("circuit")
        if circuit and record["recall"]["train_seed"] == 1 and circuit["target"] == "k2":
            circuit["edges"] = circuit["edges"][:23]
    circuits = report_files(runs_from_records(records))["circuits.md"]
    assert "| smoke seed 1 | 46 | 23 | 23 | 0.5 | 1 |" in circuits
    assert "| **spread** over 2 finished seeds of 3 (min / median / max) | 46 / 46 / 46 | 23 / 34.5 / 46 | " \
           "23 / 34.5 / 46 | 0.5 / 0.75 / 1 | 1 / 1 / 1 |" in circuits
