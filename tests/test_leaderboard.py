"""Leaderboards from hand-built records: golden table, Pareto marks, Δ and speed-up, failed cells, formats, plots,
publishing. No models are loaded. Regenerate the golden file with FNABENCH_UPDATE_GOLDEN=1."""

from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path

import pytest

from fnabench._errors import UserError
from fnabench.harness import records as rec_io
from fnabench.harness.compare import is_exact, pareto_front
from fnabench.harness.config import ConfigError, from_dict
from fnabench.harness.leaderboard import GFLOPS_HEADER, PARETO_MARK, build_tables, fmt_number, render
from fnabench.harness.leaderboard_plot import plot
from fnabench.harness.publish import publish
from fnabench.testing import make_record
from fnabench.variants import parse_variant

GOLDEN = Path(__file__).parent / "golden" / "leaderboard.md"
REL_TOL = 2e-3  # displayed numbers carry 4 significant digits: allow a flip of the last one


def sample_records() -> list[dict]:
    """Two tasks, two models, two image sizes, a dtype that only one cell uses, a failed cell, a superseded record."""
    knn = dict(task="knn:digits", metrics=None, higher_is_better={"top1": True, "top5": True}, primary_metric="top1",
               items={"test": 500, "train": 500}, proportions={"top1": ("test", 1.0), "top5": ("test", 1.0)})
    fid = dict(task="fidelity:images", primary_metric="rel_err", higher_is_better={"rel_err": False, "cosine": True})
    out = [
        make_record("timm:vit_small", "exact:impl=sdpa", **{**knn, "metrics": {"top1": 0.9123, "top5": 0.9901}},
                    gflops=4.6123, attention_gflops=0.8123, median_s=0.100),
        make_record("timm:vit_small", "fna:layers=-6:,m=64", variant_short="fna:layers=-6:,m=64",
                    **{**knn, "metrics": {"top1": 0.9051, "top5": 0.9877}}, gflops=4.1011, attention_gflops=0.3011,
                    median_s=0.080),
        make_record("timm:vit_small", "fna:layers=-6:,m=16", **{**knn, "metrics": {"top1": 0.8702, "top5": 0.9702}},
                    gflops=3.9523, attention_gflops=0.1523, median_s=0.0625),
        # dominated: more GFLOPs and lower accuracy than fna m=64
        make_record("timm:vit_small", "nystrom:layers=-6:,m=64", **{**knn, "metrics": {"top1": 0.8811, "top5": 0.98}},
                    gflops=4.2345, attention_gflops=0.4345, median_s=0.090),
        make_record("timm:vit_small", "mask:tokens=artifact", **knn, status="failed",
                    error="RuntimeError: no artifact tokens | found\nTraceback (most recent call last): ..."),
        # the same model at another image size: its own exact reference
        make_record("timm:vit_small", "exact:impl=sdpa", **{**knn, "metrics": {"top1": 0.9301, "top5": 0.9912}},
                    gflops=18.45, attention_gflops=5.123, median_s=0.400, image_size=448),
        make_record("timm:vit_small", "fna:layers=-6:,m=64", variant_short="fna:layers=-6:,m=64",
                    **{**knn, "metrics": {"top1": 0.9255, "top5": 0.9903}}, gflops=13.61, attention_gflops=0.6512,
                    median_s=0.200, image_size=448),
        # a half-precision cell without an exact of its own: no Δ, no speed-up
        make_record("timm:vit_small", "fna:layers=-6:,m=64", variant_short="fna:layers=-6:,m=64",
                    **{**knn, "metrics": {"top1": 0.9049, "top5": 0.9876}}, gflops=4.1011, attention_gflops=0.3011,
                    median_s=0.050, dtype="bfloat16"),
        make_record("tiny:vit", "exact:impl=sdpa", **fid, metrics={"rel_err": 0.0, "cosine": 1.0}, gflops=0.01234,
                    image_size=32, median_s=0.002),
        make_record("tiny:vit", "fna:m=16", **fid, metrics={"rel_err": 0.04321, "cosine": 0.9987}, gflops=0.01012,
                    image_size=32, median_s=0.0016),
        make_record("tiny:vit", "fna:m=16+mask", **fid, metrics={"rel_err": 0.03012, "cosine": 0.9991},
                    gflops=0.01012, image_size=32, median_s=0.0018),
    ]
    # an older record of a cell that was rerun: only the newest may show
    old = make_record("tiny:vit", "fna:m=16", **fid, metrics={"rel_err": 0.5, "cosine": 0.5}, gflops=0.01012,
                      image_size=32, finished="2024-12-31T00:00:00+00:00")
    return [old, *out]


# ---------------------------------------------------------------------------------------------- golden comparison

_NUM = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)(×?)$")


def _split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip())
    return [c.strip() for c in cells[1:-1]]


def compare_markdown(actual: str, expected: str, rel_tol: float = REL_TOL) -> list[str]:
    """Differences between two rendered markdown leaderboards, cell by cell; numbers within ``rel_tol``."""
    diffs = []
    a_lines, e_lines = actual.strip().splitlines(), expected.strip().splitlines()
    if len(a_lines) != len(e_lines):
        diffs.append(f"{len(a_lines)} lines, expected {len(e_lines)}")
    for n, (a, e) in enumerate(zip(a_lines, e_lines, strict=False), 1):
        if not (a.startswith("|") and e.startswith("|")):
            if a.strip() != e.strip():
                diffs.append(f"line {n}: {a!r} != {e!r}")
            continue
        a_cells, e_cells = _split_row(a), _split_row(e)
        if len(a_cells) != len(e_cells):
            diffs.append(f"line {n}: {len(a_cells)} cells, expected {len(e_cells)}")
            continue
        for col, (x, y) in enumerate(zip(a_cells, e_cells, strict=True), 1):
            mx, my = _NUM.match(x), _NUM.match(y)
            if mx and my and mx.group(2) == my.group(2):
                if not math.isclose(float(mx.group(1)), float(my.group(1)), rel_tol=rel_tol, abs_tol=1e-12):
                    diffs.append(f"line {n} col {col}: {x} != {y} (rel tol {rel_tol})")
            elif x != y:
                diffs.append(f"line {n} col {col}: {x!r} != {y!r}")
    return diffs


def test_golden_github_table():
    actual = render(sample_records(), "github")
    if os.environ.get("FNABENCH_UPDATE_GOLDEN") == "1" or not GOLDEN.exists():
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(actual)
        if os.environ.get("FNABENCH_UPDATE_GOLDEN") != "1":
            pytest.fail(f"golden file {GOLDEN} was missing and has been written; check it in and rerun")
    diffs = compare_markdown(actual, GOLDEN.read_text())
    assert not diffs, "leaderboard differs from golden file (FNABENCH_UPDATE_GOLDEN=1 regenerates it):\n" + \
        "\n".join(diffs)


def test_golden_comparison_tolerates_rounding_but_not_changes():
    golden = GOLDEN.read_text() if GOLDEN.exists() else render(sample_records())
    assert golden.count(" 0.9051 ") == 1 and "1.25×" in golden
    assert compare_markdown(golden.replace(" 0.9051 ", " 0.9052 "), golden) == []
    assert compare_markdown(golden.replace(" 0.9051 ", " 0.9151 "), golden)
    assert compare_markdown(golden.replace("1.25×", "1.25 "), golden)  # units are compared exactly
    assert compare_markdown(golden.replace("knn:digits", "knn:iris"), golden)
    assert compare_markdown(golden.replace(PARETO_MARK, " ", 1), golden)


# ---------------------------------------------------------------------------------------------- table content


def _table(task: str, records: list[dict] | None = None):
    return next(t for t in build_tables(records or sample_records()) if t.task == task)


def _row(table, model: str, variant: str) -> dict:
    i = next(i for i, v in enumerate(table.values) if v["model"] == model and v["variant"] == variant)
    return {"cells": dict(zip(table.headers, table.rows[i], strict=True)), "values": table.values[i],
            "pareto": table.pareto[i], "failed": table.failed[i], "exact": table.exact[i]}


def test_sample_records_are_schema_valid():
    for r in sample_records():
        rec_io.validate(r)


def test_one_row_per_cell_latest_record_wins():
    t = _table("fidelity:images")
    assert len(t.rows) == 3
    assert _row(t, "tiny:vit @32px", "fna:m=16")["values"]["metrics"]["rel_err"] == pytest.approx(0.04321)


def test_headers_units_and_primary_first():
    t = _table("knn:digits")
    assert t.headers[:5] == ["model", "variant", "top1 ↑", "top1 s.e.", "top5 ↑"]  # s.e. beside its metric
    assert GFLOPS_HEADER in t.headers and "2×MAC" in GFLOPS_HEADER
    assert t.title == "knn:digits — primary metric: top1 (higher is better)"
    assert _table("fidelity:images").title.endswith("rel_err (lower is better)")
    assert _table("fidelity:images").headers[2] == "rel_err ↓"


def test_delta_and_speedup_against_exact_of_same_model_and_settings():
    t = _table("knn:digits")
    row = _row(t, "timm:vit_small @224px (dtype=float32)", "fna:layers=-6:,m=64")
    assert row["values"]["delta"] == pytest.approx(0.9051 - 0.9123)
    assert row["values"]["speedup"] == pytest.approx(0.100 / 0.080)
    assert row["cells"]["speed-up vs exact"] == "1.25×"
    assert row["cells"]["Δ top1 vs exact"] == "-0.0072"
    # the 448px variant compares with the 448px exact, not the 224px one
    big = _row(t, "timm:vit_small @448px (dtype=float32)", "fna:layers=-6:,m=64")
    assert big["values"]["delta"] == pytest.approx(0.9255 - 0.9301)
    assert big["values"]["speedup"] == pytest.approx(2.0)
    # the exact row is the reference
    ref = _row(t, "timm:vit_small @224px (dtype=float32)", "exact")
    assert ref["exact"] and ref["cells"]["Δ top1 vs exact"] == "ref"
    # a cell with no exact under the same settings gets no Δ / speed-up, and its label says how it differs
    half = _row(t, "timm:vit_small @224px (dtype=bfloat16)", "fna:layers=-6:,m=64")
    assert half["values"]["delta"] is None and half["cells"]["speed-up vs exact"] == "—"
    assert half["cells"]["Δ top1 vs exact"] == "—"


def test_exact_detection():
    assert is_exact("exact:impl=sdpa") and is_exact("exact:impl=math") and is_exact("exact")
    assert not is_exact("exact:impl=sdpa+mask:tokens=artifact") and not is_exact("fna:m=64")


def test_paired_speedup_measured_by_the_runner_wins_over_medians_of_separate_cells():
    fna = make_record("m", "fna:m=8", metrics={"acc": 0.8}, gflops=1.0, median_s=0.1)
    fna["timing"]["speedup"] = 1.5  # timed interleaved with exact on the same batch
    recs = [make_record("m", "exact:impl=sdpa", metrics={"acc": 0.9}, gflops=2.0, median_s=0.3), fna]
    row = _row(_table("fidelity:images", recs), "m @224px", "fna:m=8")
    assert row["values"]["speedup"] == pytest.approx(1.5) and row["cells"]["speed-up vs exact"] == "1.50×"
    # it needs no exact record in the same results
    alone = _row(_table("fidelity:images", [fna]), "m @224px", "fna:m=8")
    assert alone["values"]["speedup"] == pytest.approx(1.5)


def test_the_median_of_paired_rounds_is_the_speedup_when_rounds_were_kept():
    """One slow round of the variant drags a ratio of medians; the paired rounds' median does not move."""
    fna = make_record("m", "fna:m=8", metrics={"acc": 0.8}, gflops=1.0, median_s=0.1,
                      speedup_rounds=[1.10, 1.12, 0.60, 1.11, 1.09])
    fna["timing"]["speedup"] = 0.96  # what exact's median / the variant's median gave
    assert _row(_table("fidelity:images", [fna]), "m @224px", "fna:m=8")["values"]["speedup"] == pytest.approx(1.10)


def test_speedup_needs_timing_on_both_sides():
    recs = [make_record("m", "exact:impl=sdpa", metrics={"acc": 0.9}, gflops=2.0),
            make_record("m", "fna:m=8", metrics={"acc": 0.8}, gflops=1.0, median_s=0.1)]
    row = _row(_table("fidelity:images", recs), "m @224px", "fna:m=8")
    assert row["values"]["speedup"] is None and row["cells"]["speed-up vs exact"] == "—"
    assert row["values"]["delta"] == pytest.approx(-0.1)


def test_failed_cell_is_shown_with_first_line_of_error():
    t = _table("knn:digits")
    row = _row(t, "timm:vit_small @224px (dtype=float32)", "mask")
    assert row["failed"] and not row["pareto"]
    assert row["cells"]["top1 ↑"] == "failed"
    assert row["cells"]["error"] == "RuntimeError: no artifact tokens | found"
    md = render(sample_records(), "github")
    assert "RuntimeError: no artifact tokens \\| found" in md and "Traceback" not in md


def test_all_failed_task_still_renders():
    recs = [make_record("m", "exact:impl=sdpa", task="knn:x", status="failed", error="OSError: no data")]
    t = _table("knn:x", recs)
    assert t.rows == [["m @224px", "exact", "failed", "", "", "", "", "", "", "OSError: no data"]]
    assert "OSError: no data" in render(recs)


# ---------------------------------------------------------------------------------------------- Pareto


def test_pareto_front_ties_and_dominated_points():
    pts = [(1.0, 0.9), (1.0, 0.9), (2.0, 0.9), (2.0, 0.95), (3.0, 0.94), (0.5, 0.5), None]
    assert pareto_front(pts, higher_is_better=True) == [True, True, False, True, False, True, False]
    # lower is better: the cheapest, lowest-error points win
    assert pareto_front([(1.0, 0.1), (2.0, 0.05), (2.0, 0.2), (3.0, 0.05)], higher_is_better=False) == \
        [True, True, False, False]
    assert pareto_front([(1.0, float("nan")), (2.0, 0.5)]) == [False, True]


def test_pareto_marks_in_table():
    t = _table("knn:digits")
    marked = {(v["model"], v["variant"]) for v, p in zip(t.values, t.pareto, strict=True) if p}
    assert marked == {
        ("timm:vit_small @224px (dtype=float32)", "fna:layers=-6:,m=16"),  # cheapest at 224px
        ("timm:vit_small @224px (dtype=float32)", "fna:layers=-6:,m=64"),  # tied GFLOPs, higher accuracy than bf16
        ("timm:vit_small @224px (dtype=float32)", "exact"),
        ("timm:vit_small @448px (dtype=float32)", "fna:layers=-6:,m=64"),
        ("timm:vit_small @448px (dtype=float32)", "exact"),
    }
    for row, p in zip(t.rows, t.pareto, strict=True):
        assert (row[t.headers.index("Pareto")] == PARETO_MARK) == p
    # lower-is-better task: fna+mask has the same GFLOPs as fna and a lower error → fna is dominated
    f = _table("fidelity:images")
    assert [v["variant"] for v, p in zip(f.values, f.pareto, strict=True) if p] == ["exact", "fna:m=16+mask"]


# ---------------------------------------------------------------------------------------------- formats, plot


def test_every_format_renders():
    recs = sample_records()
    rows = list(csv.DictReader(io.StringIO(render(recs, "csv"))))
    assert len(rows) == 11  # the latest record of each of the 11 cells
    fna = next(r for r in rows if r["variant"] == "fna:layers=-6:,m=64" and r["image_size"] == "448")
    assert float(fna["speedup_vs_exact"]) == pytest.approx(2.0) and fna["pareto"] == "True"
    assert float(fna["gflops"]) == pytest.approx(13.61)
    failed = next(r for r in rows if r["status"] == "failed")
    assert failed["error"].startswith("RuntimeError") and failed["top1"] == ""
    latex = render(recs, "latex")
    assert latex.count("\\begin{tabular}") == 2 and "$\\star$" in latex and "rel\\_err" in latex
    assert "★" not in latex and "×" not in latex
    html = render(recs, "html")
    assert html.count("<table>") == 2 and "<h3>knn:digits" in html
    md = render(recs, "markdown")
    assert md == render(recs, "github") and md.count("### ") == 2
    with pytest.raises(ValueError, match="accepted: github, markdown, latex, html, csv"):
        render(recs, "xlsx")


def test_number_format():
    assert fmt_number(0.912345) == "0.9123" and fmt_number(123456.7) == "123457" and fmt_number(None) == "—"
    assert fmt_number(-0.0072, sign=True) == "-0.0072" and fmt_number(0.0, sign=True) == "+0"


def test_plot_writes_png_and_svg(tmp_path):
    pytest.importorskip("matplotlib")
    paths = plot(sample_records(), tmp_path / "lb")
    names = sorted(p.name for p in paths)
    assert names == ["lb-fidelity_images.png", "lb-fidelity_images.svg", "lb-knn_digits.png", "lb-knn_digits.svg",
                     "lb.png", "lb.svg"]
    for p in paths:
        assert p.stat().st_size > 1000
    assert (tmp_path / "lb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (tmp_path / "lb.svg").read_text()
    one = plot([r for r in sample_records() if r["task"] == "knn:digits"], tmp_path / "one")
    assert sorted(p.name for p in one) == ["one.png", "one.svg"]


# ---------------------------------------------------------------------------------------------- publish


def _results(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    for r in sample_records():
        rec_io.write_record(results, r)
    (results / "sweep.toml").write_text('models = ["timm:vit_small"]\n')
    return results


def test_publish_writes_folder_and_is_idempotent(tmp_path):
    pytest.importorskip("matplotlib")
    results = _results(tmp_path)
    dest = publish(results, tmp_path / "lb" / "demo", command="fnabench run configs/demo.toml")
    files = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert {"README.md", "plot.png", "plot.svg", "config.toml"} <= files
    assert len([f for f in files if f.startswith("records/")]) == 11
    readme = (dest / "README.md").read_text()
    for needle in ("# Leaderboard: demo", "`fnabench run configs/demo.toml`", "`test-cpu`", "torch: `2.4.0`",
                   "git revision: `abc1234`", "2025-01-01T00:00:10+00:00", "### knn:digits", "![accuracy vs GFLOPs]",
                   "[config.toml](config.toml)", GFLOPS_HEADER):
        assert needle in readme, needle
    assert rec_io.read_records(dest / "records")  # the copies are valid records
    snapshot = {f: (dest / f).read_bytes() for f in files}
    publish(results, dest, command="fnabench run configs/demo.toml")
    again = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert again.keys() == snapshot.keys()
    for name in ("README.md", "config.toml", "plot.svg", *(f for f in files if f.startswith("records/"))):
        assert again[name] == snapshot[name], name


def test_publish_puts_the_configs_description_under_the_title(tmp_path, monkeypatch):
    from fnabench.harness import publish as pub

    monkeypatch.setattr(pub, "plot", lambda records, stem: [])
    results = _results(tmp_path)
    config = 'models = ["timm:vit_small"]\ndescription = """\nDigits, **500** test images.\n"""\n'
    (results / "sweep.toml").write_text(config)
    readme = (publish(results, tmp_path / "lb") / "README.md").read_text()
    assert readme.startswith("# Leaderboard: lb\n\nDigits, **500** test images.\n\n11 cells")
    assert "each timed in its own cell" in readme  # hand-built records carry no paired timing
    with pytest.raises(ConfigError, match="'description' = 3 is a int; accepted: a string"):
        from_dict({"models": ["tiny:vit"], "tasks": ["fidelity:images"], "description": 3})


def test_table_metrics_narrow_the_readme_table_and_keep_every_metric_a_click_away(tmp_path, monkeypatch):
    from fnabench.harness import publish as pub

    monkeypatch.setattr(pub, "plot", lambda records, stem: [])
    results = _results(tmp_path)
    (results / "sweep.toml").write_text('models = ["timm:vit_small"]\ntable_metrics = ["rel_err"]\n')
    readme = (publish(results, tmp_path / "lb") / "README.md").read_text()
    shown, _, hidden = readme.partition("<details><summary>All 4 metrics</summary>")
    assert hidden and "</details>" in hidden
    assert "top5" not in shown and "cosine" not in shown and "top1 ↑" in shown and "rel_err" in shown
    assert "top5 ↑" in hidden and "cosine ↑" in hidden
    records = rec_io.read_records(results)
    with pytest.raises(UserError, match=r"table metric.*'top9' in no record; accepted: cosine, rel_err, top1, top5"):
        render(records, metrics=["top9"])
    failed = [{**r, "status": "failed", "metrics": {}, "error": "boom"} for r in records]
    assert "boom" in render(failed, metrics=["top9"])  # an all-failed sweep still prints its failures


def test_publish_drops_stale_files_and_notes_missing_matplotlib(tmp_path, monkeypatch):
    results = _results(tmp_path)
    dest = tmp_path / "lb"
    (dest / "records").mkdir(parents=True)
    (dest / "records" / "0000000000000000.json").write_text("{}")
    (dest / "plot.png").write_bytes(b"old")
    (results / "sweep.toml").unlink()

    from fnabench._extras import MissingExtraError
    from fnabench.harness import publish as pub

    def no_matplotlib(*args, **kwargs):
        raise MissingExtraError("matplotlib is needed here but not importable; run: pip install 'fnabench[recall]'")

    monkeypatch.setattr(pub, "plot", no_matplotlib)
    publish(results, dest)
    readme = (dest / "README.md").read_text()
    assert "Plot skipped: matplotlib is needed" in readme and "sweep config: not available" in readme
    assert not (dest / "plot.png").exists() and not (dest / "config.toml").exists()
    assert not (dest / "records" / "0000000000000000.json").exists()
    with pytest.raises(rec_io.RecordError, match=r"sweep config .* not found"):
        publish(results, dest, config_path=tmp_path / "nope.toml")


def test_publish_keeps_the_folders_description_and_lists_a_suites_files(tmp_path, monkeypatch):
    """description.md (from RESULTS, else the folder's own) goes under the title and survives a rebuild from
    the folder's records; files another tool wrote beside the table are kept and listed."""
    from fnabench.harness import publish as pub

    monkeypatch.setattr(pub, "plot", lambda records, stem: [])
    results = _results(tmp_path)
    (results / "sweep.toml").write_text('models = ["timm:vit_small"]\ndescription = "From the config."\n')
    (results / "description.md").write_text("From the file, **by hand**.\n")
    dest = tmp_path / "lb"
    dest.mkdir()
    (dest / "extra.md").write_text("a suite's own table\n")
    (dest / ".hidden").write_text("")
    readme = (publish(results, dest) / "README.md").read_text()
    assert readme.startswith("# Leaderboard: lb\n\nFrom the config.\n\nFrom the file, **by hand**.\n\n11 cells")
    assert "- description: [description.md](description.md) (hand-written; shown above)" in readme
    assert ("- also in this folder, written by the tool that made the records, not by publish: [extra.md](extra.md)"
            in readme) and ".hidden" not in readme
    assert readme.endswith("`fnabench publish RESULTS DEST`; edit only description.md by hand.\n")
    assert (dest / "description.md").read_text() == "From the file, **by hand**.\n"
    again = publish(dest / "records", tmp_path / "lb", config_path=dest / "config.toml")  # from its records alone
    assert (again / "README.md").read_text() == readme and (dest / "extra.md").exists()
    with pytest.raises(rec_io.RecordError, match=r"description .* not found"):
        publish(results, dest, description_path=tmp_path / "nope.md")


def test_publish_without_timing_or_a_gflops_spread_says_so_and_draws_no_plot(tmp_path, monkeypatch):
    from fnabench.harness import publish as pub

    def no_plot(*args, **kwargs):
        raise AssertionError("no plot for rows that all share their GFLOPs")

    monkeypatch.setattr(pub, "plot", no_plot)
    results = tmp_path / "results"
    for seed in (0, 1):
        rec_io.write_record(results, make_record(f"m{seed}", task="recall:h3", metrics={"err": 0.1 * (seed + 1)},
                                                 higher_is_better={"err": False}, gflops=0.01, image_size=None))
    dest = tmp_path / "lb"
    dest.mkdir()
    (dest / "plot.png").write_bytes(b"stale")
    readme = (publish(results, dest) / "README.md").read_text()
    assert "(speed-up: not measured, no record carries timing)" in readme
    assert "_Plot skipped: every row of each task has the same GFLOPs" in readme and not (dest / "plot.png").exists()
    assert "- description:" not in readme and "- also in this folder" not in readme


def test_points_drawn_on_top_of_each_other_share_one_label():
    from fnabench.harness.leaderboard_plot import _coincident

    pts = [(12.25, 1.0, "exact"), (55.4, 0.978, "fna"), (12.25, 0.9999986, "mask"), (12.43, 0.88, "nystrom")]
    groups = _coincident(pts)
    assert [names for _, _, names in groups] == [["exact", "mask"], ["fna"], ["nystrom"]]
    assert _coincident([(1.0, 2.0, "only")]) == [(1.0, 2.0, ["only"])]


def _republished(name: str, tmp_path: Path, monkeypatch) -> list[dict]:
    """leaderboards/NAME rebuilt by publish from its own records, config and description (plots stubbed):
    the rebuilt README must equal the committed one; returns its records."""
    from fnabench.harness import publish as pub

    monkeypatch.setattr(pub, "plot", lambda records, stem: [stem.with_name(stem.name + ".png")])
    src = Path(__file__).parent.parent / "leaderboards" / name
    described = src / "description.md"
    (tmp_path / name).mkdir()
    for extra in src.glob("*.json"):  # files another tool wrote beside the table: publish keeps and lists them
        (tmp_path / name / extra.name).write_bytes(extra.read_bytes())
    dest = publish(src / "records", tmp_path / name, config_path=src / "config.toml",
                   command=f"fnabench publish results/{name} leaderboards/{name}",
                   description_path=described if described.is_file() else None)
    assert (dest / "README.md").read_text() == (src / "README.md").read_text()
    return rec_io.read_records(src / "records")


def test_committed_offline_leaderboard_regenerates_from_its_records(tmp_path, monkeypatch):
    """leaderboards/offline-dinov2s is generated, never hand-edited: its records and config give its README."""
    records = _republished("offline-dinov2s", tmp_path, monkeypatch)
    variants = {r["variant_short"] for r in records}
    assert {"exact", "fna:layers=-6:,m=64", "fna:landmarks=random,layers=-6:,m=16", "nystrom:layers=-6:,m=64",
            "mask:tokens=all", "fna:layers=-6:,m=64+mask:tokens=all"} <= variants
    assert {r["image_size"] for r in records} == {224, 448} and all(r["status"] == "ok" for r in records)


def test_committed_recall_variants_leaderboard_regenerates_from_its_records(tmp_path, monkeypatch):
    """leaderboards/recall-variants comes from one `fnabench run` + `publish`: its records give its README."""
    records = _republished("recall-variants", tmp_path, monkeypatch)
    assert {r["model"] for r in records} == {f"recall:cpu@seed{s}" for s in (0, 1, 2)}
    assert all(r["status"] == "ok" and r["kv_cache"]["full_bytes"] > 0 for r in records)
    leaky = {r["variant_short"] for r in records if r["causal"]["leaks_future"]}
    assert leaky == {"fna:landmarks=fps,m=16,pinv=ridge (sees the future)"}
    assert {"exact", "fna:landmarks=stride,m=16,pinv=ridge", "nystrom:m=16,pinv=ridge",
            "mask:tokens=first"} <= {r["variant_short"] for r in records}


def test_committed_fna_inverses_leaderboard_regenerates_from_its_records(tmp_path, monkeypatch):
    """leaderboards/fna-inverses backs FNA's default inverse: its README comes from its records alone."""
    records = _republished("fna-inverses", tmp_path, monkeypatch)
    records = [r for r in records if r["status"] == "ok"]
    by = {(r["image_size"], r["variant"]): r["metrics"]["cos_sim"] for r in records}
    for size in (224, 448):  # the measurement the default rests on: ridge beats the official Newton inverse
        ridge = by[(size, parse_variant("fna:m=64").canonical)]
        newton = by[(size, parse_variant("fna:m=64,pinv=newton").canonical)]
        assert ridge > newton


def test_a_folder_rebuilt_in_place_from_its_own_records_keeps_its_config_and_readme(tmp_path, monkeypatch):
    """`fnabench publish leaderboards/X/records leaderboards/X` must not drop the folder's config.toml."""
    import shutil

    from fnabench.harness import publish as pub

    monkeypatch.setattr(pub, "plot", lambda records, stem: [stem.with_name(stem.name + ".png")])
    src = Path(__file__).parent.parent / "leaderboards" / "fna-inverses"
    copy = tmp_path / "fna-inverses"
    shutil.copytree(src, copy)
    publish(copy / "records", copy, command="fnabench publish results/fna-inverses leaderboards/fna-inverses")
    assert (copy / "config.toml").read_bytes() == (src / "config.toml").read_bytes()
    assert (copy / "README.md").read_text() == (src / "README.md").read_text()


def test_committed_classify_offline_leaderboard_regenerates_from_its_records(tmp_path, monkeypatch):
    """leaderboards/classify-offline (a real backbone with its own trained head) comes from one `fnabench run`
    + `publish`; its records carry what its reading rests on."""
    records = _republished("classify-offline", tmp_path, monkeypatch)
    assert all(r["status"] == "ok" and r["task"] == "classify:shapes" for r in records)
    by = {r["variant_short"]: r for r in records}
    assert {"exact", "fna:layers=-6:,m=16", "fna:layers=-6:,m=32", "fna:layers=-6:,m=64",
            "fna:landmarks=random,layers=-6:,m=32", "nystrom:layers=-6:,m=32", "mask:tokens=all"} == set(by)
    top1 = {v: r["metrics"]["top1"] for v, r in by.items()}
    assert top1["exact"] > 4 * 12.5  # far above chance: the head was trained
    assert all(r["items"] == {"test": 1000, "classes": 8} and r["flops"]["forward"] == "logits" for r in records)
    # FNA's accuracy grows with m; at m = 32 its FPS landmarks beat random ones and Nyström's segment means
    assert top1["fna:layers=-6:,m=16"] < top1["fna:layers=-6:,m=32"] < top1["fna:layers=-6:,m=64"]
    assert top1["fna:layers=-6:,m=32"] > max(top1["fna:landmarks=random,layers=-6:,m=32"],
                                             top1["nystrom:layers=-6:,m=32"])
    assert by["fna:layers=-6:,m=32"]["flops"]["attention"] < by["exact"]["flops"]["attention"]
    # FNA m = 64 matches exact within one binomial standard error of 1000 images
    assert abs(top1["fna:layers=-6:,m=64"] - top1["exact"]) < 100 * math.sqrt(0.7 * 0.3 / 1000)
    # the mask finds no artifact token in DINOv2-S here: its row is exact's, class by class
    assert by["mask:tokens=all"]["details"]["per_class_top1"] == by["exact"]["details"]["per_class_top1"]


def test_committed_seg_offline_leaderboard_regenerates_from_its_records(tmp_path, monkeypatch):
    """leaderboards/seg-offline (mmseg's test loop, offline:dinov2-s, trained linear head) comes from its records:
    exact segments far above chance (12.5 mIoU), ToMe's counted GFLOPs fall with r, every approximation
    counts fewer GFLOPs than exact at 1025 tokens, and each speed-up was timed against exact in its own cell."""
    records = _republished("seg-offline", tmp_path, monkeypatch)
    assert all(r["status"] == "ok" for r in records)
    by = {r["variant_short"]: r for r in records}
    assert {"exact", "fna:m=32", "fna:m=64", "fna:landmarks=random,m=64", "nystrom:m=64", "mask:tokens=all",
            "tome:r=40", "tome:r=48"} <= set(by)
    assert all(r["task"] == "mmseg:synthetic-dinov2s-linear" and r["items"] == {"test": 48} for r in records)
    assert by["exact"]["metrics"]["mIoU"] > 60
    tome = [by[f"tome:r={r}"]["flops"]["total"] for r in (40, 48)]
    assert tome == sorted(tome, reverse=True) and tome[0] < by["exact"]["flops"]["total"]
    assert all(by[v]["flops"]["total"] < by["exact"]["flops"]["total"] for v in by if v.startswith(("fna", "nys")))
    assert all(r["flops"]["input_shape"] == [1, 3, 448, 448] for r in records)
    timed = [r for r in records if r["variant_short"] != "exact"]
    assert all(r["timing"]["reference"]["variant"] == "exact:impl=sdpa" and len(r["timing"]["speedup_rounds"]) == 4
               for r in timed)


def test_committed_vqa_offline_leaderboard_regenerates_from_its_records(tmp_path, monkeypatch):
    """leaderboards/vqa-offline comes from one `fnabench run configs/sweeps/vqa_offline.toml` + `publish`: its README
    comes from its records; every variant of its config ran, on all 200 held-out questions, and the trained
    model measures something (exact far above the 25 % chance)."""
    from fnabench.harness.config import load
    from fnabench.models.registry import is_causal_model

    records = _republished("vqa-offline", tmp_path, monkeypatch)
    config = load(Path(__file__).parent.parent / "leaderboards" / "vqa-offline" / "config.toml")
    ok = {r["variant"]: r for r in records if r["status"] == "ok"}
    assert set(config.canonical_variants(causal=lambda spec: is_causal_model("offline:llava-shapes", spec))) <= set(ok)
    assert all(r["task"] == "lmms:fnabench_shapes_vqa" and r["items"] == {"test": 200} for r in ok.values())
    exact = ok[parse_variant("exact").canonical]
    assert exact["metrics"]["exact_match"] >= 0.5
    for spec in ("visionzip:tokens=16", "fastv:tokens=16,layers=1", "fna:m=16,layers=-6:"):  # fewer counted FLOPs
        assert ok[parse_variant(spec).canonical]["flops"]["total"] < exact["flops"]["total"]
