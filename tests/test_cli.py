"""The sweep end to end through the CLI: records, resumption, failed cells, bad configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_SWEEP

from fnabench.cli.main import main
from fnabench.harness import records as rec
from fnabench.harness.config import ConfigError, from_dict
from fnabench.harness.runner import Runner

pytest.importorskip("timm")



@pytest.fixture
def sweep(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(TINY_SWEEP)
    return path


def test_tiny_sweep_end_to_end(sweep, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["run", str(sweep), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "fidelity:synthetic" in printed and "tiny:vit @32px" in printed
    assert "3 cells run, 0 already done, 0 failed" in printed
    records = rec.read_records(out)  # validates every record against the schema
    assert len(records) == 3 and {r["status"] for r in records} == {"ok"}
    by_variant = {r["variant_short"]: r for r in records}
    exact = by_variant["exact"]
    assert exact["metrics"]["cos_sim"] == pytest.approx(1.0, abs=1e-6)
    assert exact["metrics"]["rel_err"] < 1e-5
    fna = by_variant["fna:layers=-2:,m=4"]
    assert 0 < fna["metrics"]["rel_err"] < 1
    assert fna["flops"]["total"] > 0 and fna["timing"]["median_s"] > 0 and fna["peak_memory_bytes"] >= 0
    assert exact["environment"]["versions"]["torch"]
    assert (out / "sweep.toml").read_text() == TINY_SWEEP
    for r in records:
        assert (out / f"{r['id']}.json").is_file()


def test_cells_are_timed_against_exact_in_the_same_window(sweep, tmp_path):
    from fnabench.harness import config as cfg

    out = tmp_path / "results"
    Runner(cfg.override(cfg.load(sweep), out=str(out)), quiet=True).run()
    by_variant = {r["variant_short"]: r for r in rec.read_records(out)}
    exact, fna = by_variant["exact"], by_variant["fna:layers=-2:,m=4"]
    assert "reference" not in exact["timing"] and "speedup" not in exact["timing"]
    ref = fna["timing"]["reference"]
    assert ref["variant"] == "exact:impl=sdpa" and ref["median_s"] > 0 and ref["repeats"] == 1
    rounds = [r / v for v, r in zip(fna["timing"]["times_s"], ref["times_s"], strict=True)]
    assert fna["timing"]["speedup"] == pytest.approx(sorted(rounds)[len(rounds) // 2])  # median of paired rounds
    from fnabench.harness.publish import publish

    readme = (publish(out, tmp_path / "lb") / "README.md").read_text()
    assert "the two timed in alternating rounds on the same batch" in readme


def test_retime_remeasures_done_cells_and_keeps_their_results(sweep, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["run", str(sweep), "--out", str(out), "--quiet"]) == 0
    before = {r["id"]: r for r in rec.read_records(out)}
    counted = next(iter(before.values()))["items"]
    for path in out.glob("*.json"):  # as records written before fnabench counted items
        old = json.loads(path.read_text())
        old.pop("items"), old.pop("proportions")
        path.write_text(json.dumps(old))
    capsys.readouterr()
    assert main(["run", str(sweep), "--out", str(out), "--quiet", "--retime"]) == 0
    assert "0 cells run, 0 already done, 3 retimed, 0 failed" in capsys.readouterr().out
    after = {r["id"]: r for r in rec.read_records(out)}
    assert after.keys() == before.keys()
    for cid, old in before.items():
        new = after[cid]
        assert new["metrics"] == old["metrics"] and new["flops"] == old["flops"] and new["started"] == old["started"]
        assert new["timing"]["retimed"]["at"] >= old["finished"]
        assert new["timing"]["retimed"]["environment"]["versions"]["torch"]
        assert new["items"] == counted  # the retime recounted what the metrics stand on
    from fnabench.harness.publish import publish
    from fnabench.harness.records import cpu_name

    readme = (publish(out, tmp_path / "lb") / "README.md").read_text()
    assert "latency of 3 cells re-measured with `fnabench run --retime`" in readme and f"`{cpu_name()} (" in readme


def test_resume_computes_only_missing_cells(sweep, tmp_path, monkeypatch):
    out = tmp_path / "results"
    from fnabench.harness import config as cfg

    config = cfg.override(cfg.load(sweep), out=str(out))
    first = Runner(config, quiet=True).run()
    assert len(first.ran) == 3
    kept = sorted(out.glob("*.json"))[0]
    for f in out.glob("*.json"):
        if f != kept:
            f.unlink()
    before = json.loads(kept.read_text())
    second = Runner(config, quiet=True).run()
    assert len(second.ran) == 2 and second.skipped == [before["id"]]
    assert json.loads(kept.read_text()) == before  # the finished cell was not touched
    third = Runner(config, quiet=True).run()
    assert third.ran == [] and len(third.skipped) == 3


def test_failing_cell_is_recorded_and_sweep_goes_on(sweep, tmp_path, capsys, monkeypatch):
    import fnabench.variants.fna as fna_module

    def broken(*args, **kwargs):
        raise FloatingPointError("landmark block\nis singular")

    monkeypatch.setattr(fna_module, "fna_attention", broken)  # a failure only running the cell finds
    out = tmp_path / "results"
    code = main(["run", str(sweep), "--out", str(out), "--quiet", "--variants", "exact", "fna:m=4", "nystrom:m=4"])
    assert code == 1
    records = {r["variant_short"]: r for r in rec.read_records(out)}
    assert records["exact"]["status"] == "ok" and records["nystrom:m=4"]["status"] == "ok"
    failed = records["fna:m=4"]
    assert failed["status"] == "failed" and "singular" in failed["error"] and "\n" not in failed["error"]
    captured = capsys.readouterr()
    assert "1 failed" in captured.out and "cell failed" in captured.err
    # the failed cell is retried on the next run, the good ones are not
    summary = Runner(from_dict({**_tiny_dict(), "variants": ["exact", "fna:m=4"], "out": str(out)}),
                     quiet=True).run()
    assert len(summary.failed) == 1 and len(summary.skipped) == 1


def test_a_nan_metric_is_a_failed_cell_with_its_reason_not_an_ok_one(sweep, tmp_path, monkeypatch):
    from fnabench.tasks.fidelity import FidelityTask

    evaluate = FidelityTask.evaluate

    def nan_under_fna(self, loaded, data, settings):  # exact's features are its own (cos_sim 1); FNA's are not
        metrics = evaluate(self, loaded, data, settings)
        return {**metrics, "cos_sim": float("nan")} if metrics["cos_sim"] < 1 - 1e-6 else metrics

    monkeypatch.setattr(FidelityTask, "evaluate", nan_under_fna)
    out = tmp_path / "results"
    assert main(["run", str(sweep), "--out", str(out), "--quiet", "--variants", "exact", "fna:m=4"]) == 1
    records = {r["variant_short"]: r for r in rec.read_records(out)}
    assert records["exact"]["status"] == "ok"
    failed = records["fna:m=4"]
    assert failed["status"] == "failed" and failed["metrics"] == {}
    assert "NonFiniteMetricError" in failed["error"] and "cos_sim=nan" in failed["error"]


def test_a_variant_the_model_cannot_take_fails_before_any_cell(sweep, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["run", str(sweep), "--out", str(out), "--quiet", "--variants", "exact", "fna:m=4,tower=text"]) == 2
    err = capsys.readouterr().err.strip()
    assert "tiny:vit" in err and "tower=image|all" in err and "\n" not in err
    assert not out.exists()


def _tiny_dict():
    from fnabench.harness.config import tomllib

    return tomllib.loads(TINY_SWEEP)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("models = ['tiny:vit']\ntasks = ['fidelity:images']\nbogus = 1\n", "unknown config key 'bogus'"),
        ("models = ['tiny:vit']\ntasks = ['fidelity:images']\nvariants = ['fna:m=0']\n", "bad value '0'"),
        ("models = ['tiny:vit']\ntasks = ['nope:x']\n", "unknown task 'nope:x'; accepted:"),
        ("models = ['nope:x']\ntasks = ['fidelity:images']\n", "unknown model 'nope:x'; accepted:"),
        ("models = ['tiny:vit'\n", "invalid TOML"),
        ("models = ['tiny:vit']\ntasks = ['fidelity:images']\ndtype = 'int8'\n", "accepted: float32"),
        ("tasks = ['fidelity:images']\n", "no models"),
    ],
)
def test_bad_configs_exit_2_with_one_line(tmp_path, capsys, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing ran


@pytest.mark.parametrize("argv, fragment", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["leaderboard"], "the following arguments are required: results"),
    (["list", "widgets"], "invalid choice: 'widgets'"),
    (["run", "x.toml", "--batch-size", "many"], "invalid int value: 'many'"),
    (["recall", "train", "--preset", "nope"], "invalid choice: 'nope'"),
])
def test_usage_errors_are_one_line_exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err and err.startswith("fnabench")


def test_cli_flags_override_config(sweep):
    from fnabench.harness import config as cfg

    config = cfg.override(cfg.load(sweep), limit=2, device="cpu", dtype="bfloat16", out="x")
    assert (config.limit, config.dtype, config.out) == (2, "bfloat16", "x")
    with pytest.raises(ConfigError, match="limit must be"):
        cfg.override(config, limit=0)
    # --tasks drops the options of the tasks it leaves out (the published offline sweep's knn options, say)
    full = cfg.load(Path(__file__).parent.parent / "configs" / "sweeps" / "offline_dinov2s.toml")
    assert "knn:digits" in full.task_options
    only = cfg.override(full, tasks=["fidelity:images"])
    assert only.tasks == ["fidelity:images"] and only.task_options == {}
    default = cfg.load(None)  # the main job: fidelity at a size where FNA can win, with a reading guide
    assert default.image_sizes == [448] and default.tasks == ["fidelity:images"]
    assert default.description.startswith("How to read this") and default.timing_repeats >= 6


def test_list_and_leaderboard_commands(sweep, tmp_path, capsys):
    assert main(["list", "variants"]) == 0
    assert "fna" in capsys.readouterr().out
    assert main(["list", "tasks"]) == 0  # each task with the options it declares and what they accept
    listed = capsys.readouterr().out
    assert "k (an integer >= 1)" in listed and "per_block (true or false)" in listed
    assert main(["list", "models"]) == 0
    assert "tiny:vit" in capsys.readouterr().out
    assert main(["list", "hosts"]) == 0  # the support table of the family contract
    hosts = capsys.readouterr().out
    assert "| transformers | llama | decoder | interface |" in hosts and "refused: attention sinks" in hosts
    out = tmp_path / "results"
    main(["run", str(sweep), "--out", str(out), "--quiet", "--variants", "exact"])
    capsys.readouterr()
    assert main(["leaderboard", str(out), "--format", "csv"]) == 0
    assert "cos_sim" in capsys.readouterr().out
    assert main(["leaderboard", str(tmp_path / "missing")]) == 2


def test_baseline_and_check_through_cli(sweep, tmp_path, capsys):
    out = tmp_path / "results"
    main(["run", str(sweep), "--out", str(out), "--quiet"])
    base = tmp_path / "base.json"
    assert main(["baseline", str(out), "-o", str(base), "--speed-tolerance", "10"]) == 0
    assert main(["check", str(out), "--baseline", str(base)]) == 0
    data = json.loads(base.read_text())
    # lower the recorded metric of one cell: check must fail with a table of what moved
    victim = next(p for p in out.glob("*.json") if json.loads(p.read_text())["variant"].startswith("fna"))
    record = json.loads(victim.read_text())
    record["metrics"]["cos_sim"] -= 0.5
    victim.write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["check", str(out), "--baseline", str(base)]) == 1
    assert "cos_sim" in capsys.readouterr().out
    assert data  # the baseline is real JSON


def test_task_options_are_part_of_a_cells_identity():
    from fnabench.harness.runner import cells

    base = from_dict(_tiny_dict())
    changed = from_dict({**_tiny_dict(), "task_options": {"fidelity:synthetic": {"num_synthetic": 4}}})
    assert {c.id for c in cells(base)}.isdisjoint({c.id for c in cells(changed)})  # no stale reuse


def test_records_say_how_many_items_and_how_the_speedup_spread(sweep, tmp_path, monkeypatch):
    from fnabench.harness import runner as runner_module
    from fnabench.harness.leaderboard import build_tables

    loads = []
    real_load = runner_module.load_model
    monkeypatch.setattr(runner_module, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    out = tmp_path / "results"
    Runner(from_dict({**_tiny_dict(), "timing_repeats": 3, "out": str(out)}), quiet=True).run()
    assert len(loads) == 1  # preflight's load is the one the cells use
    by_variant = {r["variant_short"]: r for r in rec.read_records(out)}
    fna = by_variant["fna:layers=-2:,m=4"]
    assert fna["items"] == {"test": 4}  # limit = 4 synthetic images
    rounds = fna["timing"]["speedup_rounds"]
    assert len(rounds) == 3 and all(r > 0 for r in rounds)
    assert fna["timing"]["times_s"] and len(fna["timing"]["reference"]["times_s"]) == 3
    busy = fna["timing"]["others_busy_cores"]
    assert busy is None or busy >= 0
    table = next(iter(build_tables(rec.read_records(out))))
    assert table.notes[0].startswith("Items per row: 4 test.") and "Pareto front of cos_sim" in table.notes[2]


def test_probe_records_carry_test_and_train_counts_and_a_standard_error(tmp_path):
    from fnabench.harness.leaderboard import build_tables, render

    pytest.importorskip("sklearn")
    out = tmp_path / "results"
    Runner(from_dict({**_tiny_dict(), "tasks": ["knn:digits"], "variants": ["exact"], "out": str(out),
                      "task_options": {"knn:digits": {"limit": 40, "k": 5}}}), quiet=True).run()
    (record,) = rec.read_records(out)
    assert record["items"] == {"test": 20, "train": 20} and record["proportions"]["top1"] == ["test", 100.0]
    (table,) = build_tables([record])
    p = record["metrics"]["top1"] / 100
    assert table.values[0]["se"] == pytest.approx(100 * (p * (1 - p) / 20) ** 0.5)
    assert "top1 s.e." in table.headers and "20 test, 20 train" in render([record])
    assert "n_test" in render([record], "csv").splitlines()[0]


def test_identical_rerun_passes_the_gate_and_a_changed_number_fails_it(sweep, tmp_path, capsys):
    """The default-sweep story in small: run twice, baseline the first, check the second."""
    first, second, base = tmp_path / "first", tmp_path / "second", tmp_path / "base.json"
    for out in (first, second):
        assert main(["run", str(sweep), "--out", str(out), "--quiet", "--timing-repeats", "5"]) == 0
    assert main(["baseline", str(first), "-o", str(base)]) == 0
    capsys.readouterr()
    assert main(["check", str(second), "--baseline", str(base)]) == 0, capsys.readouterr().out
    victim = next(p for p in second.glob("*.json") if json.loads(p.read_text())["variant"].startswith("nystrom"))
    original = victim.read_text()
    for change in ("metric", "flops"):
        record = json.loads(original)
        if change == "metric":
            record["metrics"]["cos_sim"] -= 0.05
        else:
            record["flops"]["total"] += record["flops"]["total"] // 100
        victim.write_text(json.dumps(record))
        capsys.readouterr()
        assert main(["check", str(second), "--baseline", str(base)]) == 1
        assert ("metric cos_sim" if change == "metric" else "GFLOPs") in capsys.readouterr().out


def test_weights_missing_offline_fail_their_cells_not_the_sweep(sweep, tmp_path, capsys):
    """Preflight refuses mistakes, but a model whose weights are not cached is the machine's state: its
    cells record the one-line load error and the other model's cells run."""
    out = tmp_path / "results"
    code = main(["run", str(sweep), "--out", str(out), "--quiet", "--variants", "exact",
                 "--models", "timm:vit_tiny_patch16_224.augreg_in21k", "tiny:vit"])
    assert code == 1
    by_model = {r["model"]: r for r in rec.read_records(out)}
    assert by_model["tiny:vit"]["status"] == "ok"
    failed = by_model["timm:vit_tiny_patch16_224.augreg_in21k"]
    assert failed["status"] == "failed" and "not in the local cache" in failed["error"]
    assert "cell failed" in capsys.readouterr().err


def test_fallback_auto_records_which_blocks_ran_the_approximation(sweep, tmp_path):
    out = tmp_path / "results"
    variants = ["exact", "fna:m=4,pinv=newton,fallback=auto", "fna:m=4,fallback=auto", "fna:m=4"]
    assert main(["run", str(sweep), "--out", str(out), "--quiet", "--image-size", "32", "96",
                 "--variants", *variants]) == 0
    ran = set()
    for size in (32, 96):  # 5 tokens: exact is cheaper; 37 tokens: the approximation is
        by_variant = {r["variant_short"]: r for r in rec.read_records(out) if r["image_size"] == size}
        exact = by_variant["exact"]["flops"]["attention"]
        assert "fallback" not in by_variant["exact"] and "fallback" not in by_variant["fna:m=4"]
        ridge = by_variant["fna:m=4"]["flops"]["attention"]
        for name in ("fna:fallback=auto,m=4,pinv=newton", "fna:fallback=auto,m=4"):
            record = by_variant[name]
            layers = record["fallback"]["image"]
            assert sorted(layers["approximated"] + layers["exact"]) == list(range(6))  # tiny:vit has 6 blocks
            counted = record["flops"]["attention"]
            if layers["approximated"]:
                assert counted < exact
            else:
                assert counted == exact and record["metrics"]["rel_err"] < 1e-5
            ran.add(bool(layers["approximated"]))
        assert by_variant["fna:fallback=auto,m=4"]["flops"]["attention"] == min(ridge, exact)
    assert ran == {True, False}


def test_run_prints_the_configs_reading_guide_under_its_table(sweep, tmp_path, capsys):
    sweep.write_text(sweep.read_text() + 'description = """Read cos_sim first."""\n')
    assert main(["run", str(sweep), "--out", str(tmp_path / "r"), "--quiet", "--variants", "exact"]) == 0
    printed = capsys.readouterr().out
    assert printed.index("| exact") < printed.index("Read cos_sim first.") < printed.index("cells run")
    assert main(["run", str(sweep), "--out", str(tmp_path / "r"), "--quiet", "--variants", "exact",
                 "--format", "csv"]) == 0
    assert "Read cos_sim first." not in capsys.readouterr().out  # CSV stays parseable
