"""Regression gates on hand-built records: unchanged passes; lowered metric, changed GFLOPs, slower ratio, missing or
failed cell fail; tolerance direction respected; baseline files round-trip; fnabench.testing raises with a table."""

from __future__ import annotations

import copy
import json

import pytest

from fnabench.harness import records as rec_io
from fnabench.harness.gate import (
    BaselineError,
    check,
    load_baseline,
    make_baseline,
    save_baseline,
    tolerance_warnings,
)
from fnabench.testing import assert_no_regression, check_results, make_record

FID = {"task": "fidelity:images", "primary_metric": "cosine", "higher_is_better": {"cosine": True, "rel_err": False}}


def run(*, acc: float = 0.80, rel_err: float = 0.05, fna_gflops: float = 3.0, exact_s: float = 0.10,
        fna_s: float = 0.05) -> list[dict]:
    """A small run: exact and FNA on one model and two tasks."""
    return [
        make_record("m", "exact:impl=sdpa", "knn:digits", metrics={"top1": 0.85}, gflops=4.0, median_s=exact_s),
        make_record("m", "fna:m=16", "knn:digits", metrics={"top1": acc}, gflops=fna_gflops, median_s=fna_s),
        make_record("m", "exact:impl=sdpa", **FID, metrics={"cosine": 1.0, "rel_err": 0.0}, gflops=4.0,
                    median_s=exact_s),
        make_record("m", "fna:m=16", **FID, metrics={"cosine": 0.99, "rel_err": rel_err}, gflops=fna_gflops,
                    median_s=fna_s),
    ]


@pytest.fixture
def baseline() -> dict:
    return make_baseline(run(), tolerances={"top1": 0.02})


def whats(report) -> list[str]:
    return sorted(p.what for p in report.problems)


def test_baseline_content(baseline):
    json.dumps(baseline, allow_nan=False)  # JSON-serialisable
    fna = next(c for c in baseline["cells"].values() if c["variant"] == "fna:m=16" and c["task"] == "knn:digits")
    assert fna["metrics"]["top1"] == {"value": 0.80, "tolerance": 0.02, "higher_is_better": True}
    assert fna["gflops"] == pytest.approx(3.0) and fna["flops"] == 3_000_000_000
    assert fna["speed_ratio"] == pytest.approx(2.0)
    assert fna["settings"]["image_size"] == 224 and fna["model"] == "m"
    fid = next(c for c in baseline["cells"].values() if c["variant"] == "fna:m=16" and c["task"] == FID["task"])
    assert fid["metrics"]["rel_err"] == {"value": 0.05, "tolerance": 0.01, "higher_is_better": False}
    exacts = [c for c in baseline["cells"].values() if c["variant"].startswith("exact")]
    assert len(exacts) == 2 and all(c["speed_ratio"] is None for c in exacts)  # each task's exact is its own ref
    assert baseline["speed_tolerance"] == 0.25 and baseline["flops_tolerance"] == 0.001


def test_unchanged_run_passes(baseline):
    report = check(run(), baseline)
    assert report.ok and report.problems == [] and report.checked == 4
    assert report.render().startswith("OK: 4 baseline cell(s) checked")


def test_lowered_metric_fails_past_tolerance_only(baseline):
    assert check(run(acc=0.79), baseline).ok  # within 0.02
    report = check(run(acc=0.77), baseline)
    assert not report.ok and whats(report) == ["metric top1"]
    p = report.problems[0]
    assert (p.baseline, p.now) == ("0.8", "0.77") and "≥ 0.78" in p.allowed and "m @224px fna:m=16" in p.cell
    assert check(run(acc=0.95), baseline).ok  # better is never a regression


def test_tolerance_direction_respected(baseline):
    assert check(run(rel_err=0.0), baseline).ok  # lower-is-better metric going down: fine
    report = check(run(rel_err=0.07), baseline)  # up past 0.01: a regression
    assert whats(report) == ["metric rel_err"] and "≤ 0.06" in report.problems[0].allowed


def test_changed_gflops_fails_either_direction(baseline):
    assert check(run(fna_gflops=3.002), baseline).ok  # 0.07% < 0.1%
    assert whats(check(run(fna_gflops=3.1, fna_s=0.05 * 3.1 / 3), baseline)) == ["GFLOPs", "GFLOPs"]
    assert whats(check(run(fna_gflops=2.9), baseline)) == ["GFLOPs", "GFLOPs"]


def test_slower_ratio_fails_but_a_slower_machine_does_not(baseline):
    assert check(run(exact_s=0.30, fna_s=0.15), baseline).ok  # everything 3× slower: the ratio holds
    assert check(run(fna_s=0.065), baseline).ok  # ratio 2.0 → 1.54, within 25%
    report = check(run(fna_s=0.08), baseline)  # ratio 2.0 → 1.25: fell 37.5%
    assert whats(report) == ["speed-up vs exact", "speed-up vs exact"]
    assert report.problems[0].now.startswith("1.25×") and report.problems[0].allowed.startswith("≥ 1.50×")
    untimed = [dict(r, timing=None) for r in run()]
    assert whats(check(untimed, baseline)) == ["speed-up vs exact", "speed-up vs exact"]


def test_missing_or_failed_cell_fails(baseline):
    records = run()
    report = check(records[:-1], baseline)
    assert whats(report) == ["cell"] and report.problems[0].now == "missing"
    failed = make_record("m", "fna:m=16", **FID, status="failed", error="RuntimeError: NaN in landmarks\nmore")
    assert failed["id"] == records[-1]["id"]
    report = check([*records[:-1], failed], baseline)
    assert whats(report) == ["cell"] and report.problems[0].now == "failed: RuntimeError: NaN in landmarks"
    # a missing metric fails too
    records[1] = make_record("m", "fna:m=16", "knn:digits", metrics={"top5": 0.9}, gflops=3.0, median_s=0.05)
    assert whats(check(records, baseline)) == ["metric top1"]


def test_new_cells_are_reported_but_pass(baseline):
    extra = make_record("m", "fna:m=32", "knn:digits", metrics={"top1": 0.1}, gflops=3.5, median_s=0.07)
    report = check([*run(), extra], baseline)
    assert report.ok and report.new_cells == [extra["id"]] and "1 new cell(s)" in report.render()


def test_failed_cells_are_left_out_of_the_baseline():
    failed = make_record("m", "mask:tokens=artifact", "knn:digits", status="failed", error="boom")
    base = make_baseline([*run(), failed])
    assert failed["id"] not in base["cells"] and failed["id"] in base["excluded"]


def test_bad_tolerances_are_one_line_errors():
    with pytest.raises(BaselineError, match=r"unknown metric\(s\) 'acc'; metrics in these records: cosine"):
        make_baseline(run(), tolerances={"acc": 0.1})
    with pytest.raises(BaselineError, match="non-negative"):
        make_baseline(run(), tolerances={"top1": -1})
    with pytest.raises(BaselineError, match="no records"):
        make_baseline([])


def test_render_table_lists_what_moved(baseline):
    text = check(run(acc=0.5, fna_gflops=3.5), baseline).render()
    assert text.startswith("FAILED: 3 problem(s) in 4 baseline cell(s)")
    header = next(line for line in text.splitlines() if line.startswith("| cell"))
    assert [h.strip() for h in header.strip("|").split("|")] == ["cell", "what", "baseline", "now", "allowed"]
    assert "metric top1" in text and "GFLOPs" in text and "+16.67%" in text


def test_save_and_load_round_trip(tmp_path, baseline):
    path = save_baseline(baseline, tmp_path / "sub" / "base.json")
    assert load_baseline(path) == baseline
    assert [p.name for p in path.parent.iterdir()] == ["base.json"]  # no temp file left behind
    first = path.read_bytes()
    save_baseline(load_baseline(path), path)
    assert path.read_bytes() == first


@pytest.mark.parametrize(("text", "match"), [
    ("{not json", "not valid JSON"),
    ("[]", "expected a JSON object"),
    ('{"cells": {}}', "fnabench_baseline"),
    ('{"fnabench_baseline": 1, "speed_tolerance": 0.25, "flops_tolerance": 0.001, "cells": {"x": {"model": "m"}}}',
     "cell x has no 'variant'"),
])
def test_malformed_baseline_is_one_line_error(tmp_path, text, match):
    path = tmp_path / "b.json"
    path.write_text(text)
    with pytest.raises(BaselineError, match=match) as err:
        load_baseline(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    with pytest.raises(BaselineError, match="no baseline at"):
        load_baseline(tmp_path / "missing.json")


def test_testing_helpers_with_folders_and_files(tmp_path, baseline):
    results = tmp_path / "results"
    for r in run():
        rec_io.write_record(results, r)
    path = save_baseline(baseline, tmp_path / "base.json")
    assert_no_regression(results, path)
    assert check_results(results, baseline).ok

    worse = tmp_path / "worse"
    for r in run(acc=0.5):
        rec_io.write_record(worse, r)
    with pytest.raises(AssertionError) as err:
        assert_no_regression(worse, path)
    assert "| cell" in str(err.value) and "metric top1" in str(err.value)
    with pytest.raises(AssertionError, match="GFLOPs"):
        assert_no_regression(run(fna_gflops=5.0), copy.deepcopy(baseline))


# ---------------------------------------------------------------------------------------------- speed noise


def timed_run(fna_rounds: list[float], *, exact_s: float = 0.10, busy: float | None = 0.0,
              device_name: str = "test-cpu") -> list[dict]:
    """exact and FNA on one task, FNA timed in paired rounds against exact (ratio = median of the rounds here)."""
    ratio = sorted(fna_rounds)[len(fna_rounds) // 2]
    env = {"device_name": device_name}
    exact = make_record("m", "exact:impl=sdpa", "knn:digits", metrics={"top1": 0.85}, gflops=4.0, median_s=exact_s,
                        environment=env)
    fna = make_record("m", "fna:m=16", "knn:digits", metrics={"top1": 0.80}, gflops=3.0, median_s=exact_s / ratio,
                      speedup_rounds=fna_rounds, others_busy=busy, environment=env)
    fna["timing"]["speedup"] = ratio
    return [exact, fna]


def test_speed_spread_is_stored_and_used():
    quiet = make_baseline(timed_run([2.0, 2.02, 1.98, 2.01, 1.99]))
    cell = next(c for c in quiet["cells"].values() if c["speed_ratio"] is not None)
    assert cell["speed"]["rounds"] == 5 and 0 < cell["speed"]["log_sd"] < 0.02
    assert quiet["speed_noise"]["pooled_log_sd"] == pytest.approx(cell["speed"]["log_sd"])
    # quiet timings: the 25 % tolerance is what binds; a 30 % drop fails, a 20 % one passes
    assert check(timed_run([1.6, 1.61, 1.59, 1.6, 1.6]), quiet).ok
    report = check(timed_run([1.4, 1.41, 1.39, 1.4, 1.4]), quiet)
    assert whats(report) == ["speed-up vs exact"] and "tolerance" in report.problems[0].allowed


def test_noisy_timings_widen_the_allowance_and_the_baseline_warns():
    noisy = make_baseline(timed_run([1.2, 2.0]))  # two rounds that disagree by 50 %
    warnings = tolerance_warnings(noisy)
    assert len(warnings) == 1 and "--timing-repeats" in warnings[0] and "25%" in warnings[0]
    assert check(timed_run([1.0, 1.3]), noisy).ok  # 2.0 → 1.3 (−35 %) is inside the measured noise
    no_spread = copy.deepcopy(noisy)
    for cell in no_spread["cells"].values():
        cell["speed"] = None
    assert not check(timed_run([1.0, 1.3]), {**no_spread, "speed_noise": None}).ok  # the tolerance alone fails it
    report = check(timed_run([0.3, 0.31]), noisy)  # a 6× slow-down is not
    assert whats(report) == ["speed-up vs exact"] and "timing noise" in report.problems[0].allowed
    assert tolerance_warnings(make_baseline(timed_run([2.0, 2.01, 1.99, 2.0, 2.0]))) == []


def test_speed_timed_under_load_or_on_another_cpu_is_not_judged():
    quiet = make_baseline(timed_run([2.0, 2.01, 1.99, 2.0, 2.0], busy=0.0))
    loaded = check(timed_run([1.0, 1.01, 0.99, 1.0, 1.0], busy=1.0), quiet)
    assert loaded.ok and len(loaded.not_judged) == 1 and "other processes kept 1.0 CPU core" in loaded.not_judged[0]
    assert "not judged" in loaded.render()
    held = check(timed_run([1.9, 1.91, 1.89, 1.9, 1.9], busy=1.0), quiet)  # loaded, but the speed-up held
    assert held.ok and held.not_judged == []
    elsewhere = check(timed_run([1.0, 1.0, 1.0], device_name="other-cpu"), quiet)
    assert elsewhere.ok and "timed on 'other-cpu'" in elsewhere.not_judged[0]
    # both quiet, same CPU: a halved speed-up still fails
    assert not check(timed_run([1.0, 1.01, 0.99, 1.0, 1.0], busy=0.1), quiet).ok
    assert tolerance_warnings(make_baseline(timed_run([2.0, 2.0, 2.0], busy=1.2)))[0].startswith("1 speed-up cell")


def test_format_1_baselines_are_still_read(baseline):
    old = {k: v for k, v in baseline.items() if k != "speed_noise"}
    old["fnabench_baseline"] = 1
    for cell in old["cells"].values():
        cell.pop("speed")
    assert check(run(), old).ok and not check(run(fna_s=0.08), old).ok
