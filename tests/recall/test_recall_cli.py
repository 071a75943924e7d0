"""Recall CLI and outputs: train / eval / plot / report end to end on the smoke preset; records; user errors."""

from __future__ import annotations

import argparse
import json

import pytest

from fnabench.cli import recall_cmd as cli
from fnabench.cli.main import main
from fnabench.harness.suites import RESULT_FIELDS
from fnabench.tasks.recall import rundir
from fnabench.tasks.recall.presets import PRESETS, get_preset, paper_lr
from fnabench.tasks.recall.run_config import RunConfig, read_toml
from fnabench.tasks.recall.run_results import records_from_run

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("recall") / "smoke"
    assert cli.main(["train", "--preset", "smoke", "--out", str(out), "--threads", "1", "--quiet"]) == 0
    return out


def test_presets_follow_the_paper():
    for name, (d, layers, heads, batch, lr) in {"tiny": (72, 3, 6, 2048, 1.268e-4), "small": (96, 6, 6, 1024, 4.48e-5),
                                                "medium": (128, 12, 8, 512, 1.585e-5),
                                                "big": (192, 24, 12, 640, 1.477e-5)}.items():
        config = get_preset(name).validate()
        assert (config.model.n_embd, config.model.n_layer, config.model.n_head, config.train.batch) == (
            d, layers, heads, batch)
        assert config.train.lr == pytest.approx(lr, rel=2e-3)
        assert (config.data.state_dim, config.data.num_labels, config.data.context) == (5, 25, 251)
        assert (config.data.train_systems, config.data.val_systems) == (40_000, 100)
        assert (config.train.weight_decay, config.train.grad_clip) == (0.01, 1.0)
    assert paper_lr(512, 1.0) == pytest.approx(1.5849e-5)
    for config in PRESETS.values():
        config.validate()


def test_train_eval_plot_report(run_dir, tmp_path, capsys):
    assert [s for s, _ in rundir.list_checkpoints(run_dir)] == [0, 20, 40]
    assert cli.main(["eval", str(run_dir), "--quiet", "--threads", "1"]) == 0
    assert "k=1 emerges" in capsys.readouterr().out
    assert cli.main(["eval", str(run_dir), "--quiet", "--haystack", "1", "--probe", "unseen_label"]) == 0
    png = tmp_path / "dyn.png"
    assert cli.main(["plot", str(run_dir), "--out", str(png), "--quiet"]) == 0
    assert png.stat().st_size > 10_000
    board = tmp_path / "board"
    assert main(["recall", "report", str(run_dir), "--results", str(tmp_path / "results"), "--out-dir", str(board),
                 "--quiet"]) == 0
    assert {p.name for p in board.iterdir()} >= {"emergence.md", "ood.md", "dynamics.png", "preset.toml",
                                                 "README.md", "records"}
    ood = (board / "ood.md").read_text()
    for title in ("misdirected label", "synchronized observation", "unseen label", "unseen system"):
        assert title in ood
    assert "| smoke seed 0 |" in (board / "emergence.md").read_text()
    # the preset file round-trips into the same config
    assert RunConfig.from_dict(read_toml(board / "preset.toml")).to_dict() == rundir.load_config(run_dir).to_dict()


def test_records_have_the_harness_shape(run_dir):
    from fnabench.tasks.recall.evaluate import evaluate_probes

    cli.main(["eval", str(run_dir), "--quiet", "--haystack", "1", "--probe", "unseen_label"])
    evaluate_probes(run_dir, probes=("none", "misdirected"), progress=False)
    records = records_from_run(run_dir)
    first = records[0]
    assert set(RESULT_FIELDS) <= set(first) and "schema" not in first  # the harness completes them
    assert first["model"] == "recall:smoke@seed0" and first["variant"] == "exact"
    assert first["task"] == "recall:h2" and first["primary_metric"] == "err_k1"
    metrics = first["metrics"]
    for key in ("err_k1", "err_k2", "zero_k1", "ls_k1"):
        assert isinstance(metrics[key], float) and first["higher_is_better"][key] is False
    assert first["recall"]["training"]["examples"] == 40 * 8 and first["recall"]["training"]["parameters"] > 0
    assert 0 < first["flops"]["attention"] < first["flops"]["total"] and json.dumps(records)
    assert first["recall"]["emergence"]["1"]["threshold"] > 0
    by_task = {r["task"]: r for r in records}
    assert {"recall:h2", "recall:h1,probe=unseen_label", "recall:h2,probe=misdirected"} <= set(by_task)
    assert len(records) == len(by_task)  # the plain query's probe evaluation does not duplicate its curve
    probe = by_task["recall:h2,probe=misdirected"]
    assert probe["recall"]["emergence"] is None and not any(k.startswith("emergence") for k in probe["metrics"])
    assert by_task["recall:h1,probe=unseen_label"]["flops"]["total"] < first["flops"]["total"]  # a shorter query


def test_resume_through_the_cli(tmp_path):
    out = tmp_path / "r"
    assert cli.main(["train", "--preset", "smoke", "--out", str(out), "--until-step", "10", "--quiet"]) == 0
    assert cli.main(["train", "--out", str(out), "--quiet"]) == 0  # plain resume
    assert [s for s, _ in rundir.list_checkpoints(out)] == [0, 20, 40]
    # the same preset with more steps extends the run; any other change is refused
    assert cli.main(["train", "--preset", "smoke", "--steps", "60", "--out", str(out), "--quiet"]) == 0
    assert [s for s, _ in rundir.list_checkpoints(out)] == [0, 20, 40, 60]
    assert rundir.load_config(out).train.steps == 60
    assert cli.main(["train", "--preset", "smoke", "--seed", "5", "--out", str(out), "--quiet"]) == 2


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--preset", "smoke", "--set", "model.n_head=3"], "divisible"),
    (["train", "--preset", "smoke", "--set", "train.nope=1"], "unknown key train.nope"),
    (["train", "--preset", "smoke", "--set", "oops"], "SECTION.KEY=VALUE"),
    (["train", "--config", "/nonexistent.toml"], "config file not found"),
    (["eval", "/nonexistent-run"], "not a recall run directory"),
    (["train", "--preset", "nope"], "invalid choice"),
])
def test_user_errors_are_one_line_exit_2(argv, fragment, capsys, tmp_path):
    if argv[0] == "train" and "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(cli.main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_add_arguments_mounts_on_another_parser():
    parser = argparse.ArgumentParser(prog="fnabench")
    recall = parser.add_subparsers(dest="group").add_parser("recall")
    cli.add_arguments(recall.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["recall", "train", "--preset", "cpu", "--threads", "1"])
    assert args.preset == "cpu" and args.threads == 1 and callable(args.func)
    args = parser.parse_args(["recall", "plot", "a", "b"])
    assert args.run_dirs == ["a", "b"]


def test_throughput_command(capsys):
    assert cli.main(["throughput", "smoke", "--steps", "1", "--batch", "2", "--threads", "1"]) == 0
    assert "tokens/s" in capsys.readouterr().out


def test_config_file_and_live_eval(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('preset = "smoke"\n[train]\nsteps = 20\nseed = 2\n')
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--out", str(out), "--eval", "--quiet"]) == 0
    stored = rundir.load_config(out)
    assert (stored.preset, stored.train.steps, stored.train.seed) == ("smoke", 20, 2)
    assert len(list((out / rundir.EVALS).glob("*/step_*.json"))) == 1  # step 20 evaluated as it was saved
    assert not list((out / rundir.EVALS).glob("*/summary.json"))  # a partial curve is not the run's summary
