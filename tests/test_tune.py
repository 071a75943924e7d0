"""``fnabench tune``: the search rule on made-up points, a whole tune on a tiny model (records, resume, report),
and the published DINOv2-S tune rebuilt from its records."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fnabench.cli.main import main
from fnabench.harness import records as rec
from fnabench.harness.tune import REPORT_FILE, TUNE_FILE, Point, State, load_spec, state_from_records
from fnabench.harness.tune_report import render_report

pytest.importorskip("timm")


def _state(points: list[tuple[str, float, float | None, float | None]], budget: float = 1.0) -> State:
    """(variant, GFLOPs, proxy, task) points, with ``exact`` at 10 GFLOPs scoring 80 and ``default`` among them."""
    pts = {v: Point(v, g, p, t) for v, g, p, t in points}
    return State(pts, "exact", "default", budget, higher=True, proxy_higher=True)


def test_references_first_then_bisection_along_the_proxy_front():
    front = [(f"f{i}", 1.0 + i, 0.5 + 0.05 * i, None) for i in range(7)]  # cheaper → worse proxy
    state = _state([("exact", 10, 1.0, None), ("default", 5, 0.8, None), *front, ("off", 3.5, 0.2, None)])
    assert state.next()[0].variant == "exact"
    state.points["exact"].task = 80.0
    assert state.next()[0].variant == "default"
    state.points["default"].task = 79.5  # within: the search looks only below 5 GFLOPs now
    point, why = state.next()
    assert point.variant == "f1" and "bisection" in why  # the middle of f0..f3 (below 5 GFLOPs)
    state.points["f1"].task = 70.0  # a miss: nothing on the front at or below f1 is tried
    assert state.next()[0].variant == "f2"
    state.points["f2"].task = 79.2  # within: the new best
    assert state.best().variant == "f2"
    # nothing on the front between the miss (f1) and the best (f2): now the front above f2 (the default
    # dominates f4..f6, so f3 is all there is); "off" is off the proxy front and never tried
    point, why = state.next()
    assert point.variant == "f3" and "and exact" in why
    state.points["f3"].task = 79.0
    assert state.next() is None


def test_once_the_cheapest_is_found_the_front_up_to_exact_is_mapped_widest_gap_first():
    front = [("f2", 2, 0.7, None), ("f4", 4, 0.8, None), ("f6", 6, 0.9, None), ("f8", 8, 0.95, None)]
    state = _state([("exact", 10, 1.0, 80.0), ("default", 2, 0.7, 70.0), *front, ("off", 7, 0.5, None)])
    # default (= f2's cost and proxy) missed: bisection between it and exact: f4, f6, f8 → the middle, f6
    assert state.next()[0].variant == "f6"
    state.points["f6"].task = 79.5  # within
    assert state.next()[0].variant == "f4"  # the only front point between the miss and the best
    state.points["f4"].task = 75.0  # a miss: f6 is the cheapest within the budget
    point, why = state.next()
    assert point.variant == "f8" and "and exact" in why and state.best().variant == "f6"
    state.points["f8"].task = 79.9
    assert state.next() is None  # "off" is off the proxy front (f6 is cheaper and better on the proxy)


def test_drop_follows_the_metric_direction_and_a_failed_cell_is_a_miss():
    state = _state([("exact", 10, 1.0, 0.10), ("default", 5, 0.9, 0.105), ("x", 4, 0.8, math.nan)], budget=0.01)
    state.higher = False  # an error rate: lower is better
    assert state.drop(state.points["default"]) == pytest.approx(0.005) and state.within(state.points["default"])
    assert not state.within(state.points["x"]) and state.drop(state.points["x"]) is None
    assert state.best().variant == "default"


TINY = ["tune", "tiny:vit", "knn:digits", "--image-size", "48", "--proxy", "fidelity:synthetic",
        "--proxy-images", "4", "--m", "4,8", "--blocks", "all,3", "--landmarks", "fps,random", "--pinv", "ridge",
        "--task-option", "limit=40", "--budget", "5", "--timing-repeats", "1", "--batch-size", "8", "--threads", "1",
        "--quiet"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    """A tiny tune stopped after the two references (--max-cells 2), then resumed to four task cells."""
    out = tmp_path_factory.mktemp("tune") / "res"
    assert _tune(["--max-cells", "2", "--out", str(out)]) == 0
    first = {r["id"]: r["finished"] for r in rec.read_records(out)}
    assert _tune(["--max-cells", "4", "--out", str(out)]) == 0
    return out, first


def _tune(args: list[str]) -> int:
    """``fnabench tune`` on the tiny model with --threads 1 (thread pools spinning on a tiny model cost more than
    they give), leaving this process's thread count as it was."""
    threads = torch.get_num_threads()
    try:
        return main([*TINY, *args])
    finally:
        torch.set_num_threads(threads)


def test_a_tune_is_ordinary_records_proxies_first_then_at_most_max_cells_task_cells(tuned, capsys):
    out, _ = tuned
    records = rec.read_records(out)
    assert all(r["status"] == "ok" for r in records)
    proxy = [r for r in records if r["task"] == "fidelity:synthetic"]
    task = [r for r in records if r["task"] == "knn:digits"]
    exact_gflops = next(r["flops"]["gflops"] for r in task if r["variant"].startswith("exact"))
    # the proxy ran on every setting cheaper than exact (and the two references); nothing dearer than exact
    assert {r["variant_short"] for r in proxy} >= {"exact", "fna:m=64"} and len(proxy) >= 4
    assert all(r["flops"]["gflops"] < exact_gflops for r in proxy if r["variant_short"] not in ("exact", "fna:m=64"))
    assert len(task) == 4 and {"exact", "fna:m=64"} <= {r["variant_short"] for r in task}
    assert {r["settings"]["limit"] for r in proxy} == {4}
    assert all(r["settings"]["options"] == {"limit": 40} for r in task)
    # leaderboard, baseline and check work on it like on any sweep
    assert main(["leaderboard", str(out)]) == 0
    assert "### knn:digits" in capsys.readouterr().out
    assert main(["baseline", str(out), "-o", str(out.parent / "base.json")]) == 0
    assert main(["check", str(out), "--baseline", str(out.parent / "base.json")]) == 0


def test_a_rerun_resumes_without_redoing_cells_and_the_report_comes_from_the_records(tuned, capsys):
    out, first = tuned
    now = {r["id"]: r["finished"] for r in rec.read_records(out)}
    assert all(now[i] == first[i] for i in first) and len(now) > len(first)  # resumed: old cells kept, new ones
    assert _tune(["--max-cells", "4", "--out", str(out)]) == 0  # nothing left within 4 cells: no new cell
    assert {r["id"]: r["finished"] for r in rec.read_records(out)} == now
    report = capsys.readouterr().out
    spec = load_spec(out / TUNE_FILE)
    state, names = state_from_records(spec, rec.read_records(out))
    assert (out / REPORT_FILE).read_text().strip() == report.strip() == render_report(spec, state, names).strip()
    assert state.best() is not None and state.within(state.best())
    assert "**Hand-picked default** `fna:m=64`" in report


def test_committed_tune_leaderboard_regenerates_from_its_records(tmp_path, monkeypatch):
    """leaderboards/tune-dinov2s-knn (a tune of the real offline DINOv2-S on knn:digits): its report and README
    come from its records alone, and the search it reports is one the rule would have made."""
    from test_leaderboard import _republished

    src = Path(__file__).resolve().parents[1] / "leaderboards" / "tune-dinov2s-knn"
    records = _republished("tune-dinov2s-knn", tmp_path, monkeypatch)
    spec = load_spec(src / "config.toml")
    state, names = state_from_records(spec, records)
    assert (src / "description.md").read_text().strip() == render_report(spec, state, names).strip()
    assert all(r["status"] == "ok" for r in records) and spec.model == "offline:dinov2-s"
    task = state.evaluated()
    assert len(task) <= spec.max_cells and {state.exact, state.default} <= {p.variant for p in task}
    # every setting cheaper than exact had its proxy; none dearer than exact was run
    exact = state.points[state.exact]
    assert all(p.proxy is not None for p in state.points.values() if p.gflops < exact.gflops)
    assert all(p.gflops < exact.gflops for p in task if p.variant not in (state.exact, state.default))
    best = state.best()
    assert best is not None and state.within(best) and best.gflops < exact.gflops
    # replayed from scratch, the rule picks exactly the settings the records hold, in some order it can explain
    known = {p.variant: p.task for p in task}
    for p in state.points.values():
        p.task = None
    for _ in known:
        point, _why = state.next()
        assert point.variant in known, f"the rule would run {point.variant}, which the records do not have"
        point.task = known[point.variant]
