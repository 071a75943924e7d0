"""The recall leaderboard goes through the harness: ``recall report`` stores harness records and publishes them;
leaderboards/recall-cpu rebuilds byte for byte from its records."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fnabench.cli import recall_cmd as recall_cli
from fnabench.cli.main import main
from fnabench.harness.records import RecordError, read_records
from fnabench.harness.suites import make_record
from fnabench.tasks.recall.run_results import run_progress, runs_from_records
from fnabench.tasks.recall.tables import INTERVENTION_FILES, REPORT_FILES, report_files

BOARD = Path(__file__).resolve().parents[2] / "leaderboards" / "recall-cpu"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("recall") / "smoke"
    assert recall_cli.main(["train", "--preset", "smoke", "--out", str(out), "--threads", "1", "--quiet"]) == 0
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _regenerated(name: str, tmp_path: Path, monkeypatch, boards: Path = BOARD.parent
                 ) -> tuple[dict[str, bytes], list[dict]]:
    """Every file of leaderboards/NAME but its pictures (which need the run directories) comes back byte for byte
    from its records and description.md, through the command its README names: (committed files, records)."""
    copy = tmp_path / "leaderboards" / name
    if boards / name != copy:
        shutil.copytree(boards / name, copy)
    committed = _files(copy)
    for file in ("README.md", *REPORT_FILES, *INTERVENTION_FILES):
        (copy / file).unlink(missing_ok=True)
    monkeypatch.chdir(tmp_path)
    command = f"fnabench recall report --from-records=leaderboards/{name}/records --out-dir=leaderboards/{name}"
    assert f"- command: `{command}`" in committed["README.md"].decode()
    assert main(command.split()[1:]) == 0
    assert _files(copy) == committed
    return committed, read_records(copy / "records")


def test_committed_recall_leaderboard_regenerates_from_its_records(tmp_path, monkeypatch):
    committed, records = _regenerated("recall-cpu", tmp_path, monkeypatch)
    assert len(records) == 15 and {r["model"] for r in records} == {f"recall:cpu@seed{s}" for s in (0, 1, 2)}
    assert all(r["variant"] == "exact:impl=sdpa" and r["timing"] is None and r["flops"]["total"] == 9_959_680
               for r in records)
    readme = committed["README.md"].decode()
    assert readme.startswith("# Leaderboard: recall-cpu\n\n**Continuation before recall")
    assert "### recall:h3 — primary metric: err_k1 (lower is better)" in readme
    assert "[emergence.md](emergence.md)" in readme and "[dynamics.png](dynamics.png)" in readme
    assert "records.jsonl" not in {p.name for p in BOARD.iterdir()}


#: the committed recall report boards besides recall-cpu (tested above): recall-cpu-n5 once its seeds are published
REPORT_BOARDS = sorted(p.name for p in BOARD.parent.glob("recall-cpu?*") if (p / "emergence.md").is_file())


@pytest.mark.parametrize("name", REPORT_BOARDS)
def test_every_committed_recall_report_board_regenerates_from_its_records(name, tmp_path, monkeypatch):
    _, records = _regenerated(name, tmp_path, monkeypatch)
    assert {r["recall"]["preset"] for r in records} == {name.removeprefix("recall-")}


def test_cpu_n5_board_is_made_from_runs_then_rebuilt_from_its_records(tmp_path, monkeypatch, capsys):
    """The two commands that make leaderboards/recall-cpu-n5 (README), on two tiny runs of the n5 config file
    (state dimension 5, sustained emergence rule; one run stopped early): the first evaluates the runs and
    publishes their records with the pictures, the second rebuilds every table from the records alone, and
    rebuilding again changes nothing."""
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    config = BOARD.parents[1] / "configs" / "recall" / "cpu_n5.toml"
    tiny = [f"--set={k}" for k in ("model.n_layer=2", "model.n_embd=32", "model.n_head=2", "train.batch=8",
                                   "train.checkpoint_every=10", "data.train_systems=300", "data.val_systems=20",
                                   "eval.examples=3", "eval.traces=4")]
    for seed, until in ((0, 30), (1, 20)):  # seed 1 stops early
        assert recall_cli.main(["train", "--config", str(config), *tiny, "--steps", "30", "--until-step", str(until),
                                "--seed", str(seed), "--out", f"runs/n5-s{seed}", "--threads", "1", "--quiet"]) == 0
    capsys.readouterr()
    board = tmp_path / "leaderboards" / "recall-cpu-n5"
    assert main(["recall", "report", "runs/n5-s0", "runs/n5-s1", "--out-dir", "leaderboards/recall-cpu-n5",
                 "--threads", "1", "--quiet", "--no-patch"]) == 0  # (patching is the other report test's)
    assert "cpu-n5 seed 1 is unfinished (last checkpoint step 20 of 30)" in capsys.readouterr().err
    (board / "description.md").write_text("**Continuation before recall at state dimension 5.**\n")
    command = "fnabench recall report --from-records=leaderboards/recall-cpu-n5/records " \
              "--out-dir=leaderboards/recall-cpu-n5"
    assert main(command.split()[1:]) == 0
    committed, records = _regenerated("recall-cpu-n5", tmp_path, monkeypatch, boards=tmp_path / "leaderboards")
    assert {r["model"] for r in records} == {"recall:cpu-n5@seed0", "recall:cpu-n5@seed1"}
    assert {r["recall"]["config"]["data"]["state_dim"] for r in records} == {5}
    readme = committed["README.md"].decode()
    assert readme.startswith("# Leaderboard: recall-cpu-n5\n\n**Continuation before recall at state dimension 5")
    assert "### recall:h5 — primary metric: err_k1 (lower is better)" in readme
    for name in ("emergence.md", "ood.md", "preset.toml", "dynamics.png"):
        assert name in committed and f"[{name}]({name})" in readme
    emergence = committed["emergence.md"].decode()
    assert emergence.startswith("Emergence (sustained)") and "(unfinished: step 20 of 30)" in emergence
    assert "**Unfinished:** cpu-n5 seed 1 stopped" in emergence and "| cpu-n5 seed 0 |" in emergence
    assert "(unfinished" not in emergence.split("| cpu-n5 seed 0 |")[1].split("\n")[0]
    assert "state_dim = 5" in committed["preset.toml"].decode()


def test_report_writes_harness_records_that_publish_turns_into_the_folder(run_dir, tmp_path):
    results, board = tmp_path / "results", tmp_path / "board"
    assert main(["recall", "report", str(run_dir), "--results", str(results), "--out-dir", str(board),
                 "--quiet", "--threads", "1"]) == 0
    records = read_records(results)  # strict: every file is a valid harness record
    assert records and read_records(board / "records")
    assert sorted(p.name for p in (board / "records").iterdir()) == sorted(f"{r['id']}.json" for r in records)
    plain = next(r for r in records if r["task"] == "recall:h2")
    assert plain["model"] == "recall:smoke@seed0" and plain["variant_short"] == "exact"
    assert plain["primary_metric"] == "err_k1" and plain["higher_is_better"]["err_k1"] is False
    assert plain["settings"]["options"]["probe"] == "none" and plain["environment"]["versions"]["torch"]
    assert plain["started"] <= plain["finished"] and plain["duration_s"] >= 0
    tasks = {r["task"] for r in records}
    assert {"recall:h2", "recall:h2,probe=misdirected", "recall:h2,probe=unseen_system"} <= tasks
    readme = (board / "README.md").read_text()
    assert readme.startswith("# Leaderboard: board\n")
    assert "### recall:h2 — primary metric: err_k1 (lower is better)" in readme
    assert "| recall:smoke@seed0 | exact" in readme and "speed-up: not measured" in readme
    assert "- command: `fnabench recall report " in readme and "[ood.md](ood.md)" in readme
    made = {name: (board / name).read_text() for name in (*REPORT_FILES, "patching.md")}  # report patches each run
    assert "| smoke seed 0 |" in made["emergence.md"] and "misdirected label" in made["ood.md"]
    # the same tables come back from the records alone: one path from the records to every table
    again = tmp_path / "again"
    assert main(["recall", "report", "--from-records", str(board / "records"), "--out-dir", str(again)]) == 0
    assert {name: (again / name).read_text() for name in made} == made
    assert report_files(runs_from_records(records)) == made
    def body(text: str) -> list[str]:  # all but the title, the command and the list of the suite's files
        return [line for line in text.splitlines()[1:] if not line.startswith(("- command:", "- also in this"))]

    assert body((again / "README.md").read_text()) == body(readme)


def test_report_needs_one_source(tmp_path, capsys):
    assert main(["recall", "report", "--out-dir", str(tmp_path / "b")]) == 2
    assert main(["recall", "report", str(tmp_path), "--from-records", str(tmp_path), "--out-dir",
                 str(tmp_path / "b")]) == 2
    assert "not both or neither" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_make_record_completes_and_checks_a_suite_result():
    result = {"model": "m", "variant": "exact", "task": "t", "settings": {"device": "cpu", "seed": 3},
              "metrics": {"err": 0.5}, "primary_metric": "err", "higher_is_better": {"err": False}, "flops": None,
              "seed": 3, "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:00:01+00:00",
              "duration_s": 1.0, "mine": {"kept": True}}
    record = make_record(result, {"device": "cpu"})
    assert record["schema"] == 1 and record["status"] == "ok" and record["variant"] == "exact:impl=sdpa"
    assert record["mine"] == {"kept": True} and record["settings"]["image_size"] is None
    assert make_record({**result, "variant": "exact:impl=sdpa"}, {})["id"] == record["id"]
    with pytest.raises(RecordError, match="lacks metrics"):
        make_record({k: v for k, v in result.items() if k != "metrics"})
    with pytest.raises(RecordError, match="metric 'err' is not a number"):
        make_record({**result, "metrics": {"err": "x"}}, {})
    nan = make_record({**result, "metrics": {"err": float("nan"), "other": 1.0}}, {})  # a NaN is a failed cell
    assert nan["status"] == "failed" and nan["metrics"] == {} and "err=nan" in nan["error"]


def _and(items) -> str:
    """'a', 'a and b', 'a, b and c': a list as the description writes it."""
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" and {items[-1]}"


def test_cpu_n5_description_numbers_are_its_records():
    """Every number in leaderboards/recall-cpu-n5/description.md, recomputed from its records (or from the
    circuits table its records make)."""
    from statistics import median

    board = BOARD.parent / "recall-cpu-n5"
    text = " ".join((board / "description.md").read_text().split())
    records = read_records(board / "records")
    curve = {r["recall"]["train_seed"]: r for r in records if r["task"] == "recall:h5"}
    circuit = {(r["recall"]["train_seed"], r["recall"]["circuit"]["target"]): r["metrics"] for r in records
               if "circuit" in r["recall"]}
    seeds = sorted(curve)
    assert seeds == [0, 1, 2, 3, 4] and all(run_progress(r)["finished"] for r in curve.values())
    assert all(len(r["recall"]["curve"]["steps"]) > 1 for r in curve.values())  # every seed is on the figure
    k2 = [curve[s]["metrics"]["emergence_examples_k2"] for s in seeds]
    assert f"at {_and(f'{k // 1000:.0f}k' for k in k2)} examples (seeds 0–4; median {median(k2) / 1000:.0f}k)" in text
    recall = [s for s in seeds if "emergence_examples_k1" in curve[s]["metrics"]]
    others = [s for s in seeds if s not in recall]
    assert f"emerged in {len(recall)} seeds of {len(seeds)} within" in text
    ratios = {s: curve[s]["metrics"]["emergence_examples_k1"] / curve[s]["metrics"]["emergence_examples_k2"]
              for s in recall}
    assert _and(f"seed {s} at {curve[s]['metrics']['emergence_examples_k1'] / 1000:.0f}k ({ratios[s]:.1f}× after its "
                "continuation)" for s in recall) in text
    assert (f"seeds {_and(others)} end at {_and(format(curve[s]['metrics']['err_k1'], '.3f') for s in others)}, the "
            f"zero predictor's level ({curve[others[0]]['metrics']['zero_k1']:.3f})") in text
    assert f"in {len(others)} seeds of {len(seeds)} it had not emerged" in text
    k2c = [circuit[(s, "k2")] for s in seeds]
    assert (f"recovers {_and(format(c['recovered'], '.2f') for c in k2c)} of the observation swap's damage with "
            f"{_and(format(c['edges_kept'], '.0f') for c in k2c)} edges") in text
    for s in recall:
        assert f"seed {s}: {circuit[(s, 'k1')]['edges_kept']:.0f} edges, {circuit[(s, 'k1')]['recovered']:.2f}" in text
    quiet = [s for s in others if "recovered" not in circuit[(s, "k1")]]
    damaged = [s for s in others if s not in quiet]
    assert f"In seeds {_and(quiet)} the label swap barely changes the k = 1 error" in text
    for s in damaged:
        c = circuit[(s, "k1")]
        assert (f"in seed {s} it raises it from {c['model_err']:.3f} to {c['ablated_err']:.3f} and a "
                f"{c['edges_kept']:.0f}-edge circuit recovers {c['recovered']:.2f} of that") in text
    rows = [line.split("|") for line in (board / "circuits.md").read_text().splitlines()
            if line.startswith("| cpu-n5 seed") and line.split("|")[2].strip().isdigit()]  # the overlap table
    jaccard = sorted(float(row[5]) for row in rows)
    assert len(jaccard) == len(seeds)
    assert f"Jaccard) {jaccard[0]:.2f}–{jaccard[-1]:.2f} (median {median(jaccard):.2f})" in text
    assert f"medians over the {len(seeds)} finished seeds" in text
    assert f"with recall in {['no', 'one', 'two', 'three', 'four'][len(recall)]} seed" in text
    seconds = [f"{curve[s]['duration_s']:,.0f}" for s in seeds]
    assert f"seeds 0–4 {_and(seconds)} s" in text
