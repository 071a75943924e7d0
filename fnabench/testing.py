"""Regression checks for your own pytest, and a helper that fabricates schema-valid records for tests.

    from fnabench.testing import assert_no_regression

    def test_fna_still_good():
        assert_no_regression("results/", "baselines/my_model.json")
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fnabench.harness.compare import is_exact
from fnabench.harness.gate import CheckReport, check, load_baseline
from fnabench.harness.records import build_record, read_records, validate

__all__ = ["assert_no_regression", "check_results", "make_record"]

Results = str | os.PathLike | Iterable[dict]
Baseline = str | os.PathLike | Mapping[str, Any]


def _records(results: Results) -> list[dict]:
    if isinstance(results, (str, os.PathLike)):
        return read_records(results)
    return [validate(r) for r in results]


def check_results(results: Results, baseline: Baseline) -> CheckReport:
    """Check a results folder (or a list of records) against a baseline file (or dict); returns the report."""
    base = load_baseline(baseline) if isinstance(baseline, (str, os.PathLike)) else baseline
    return check(_records(results), base)


def assert_no_regression(results: Results, baseline: Baseline) -> None:
    """Raise AssertionError with the table of what moved when the results regress against the baseline."""
    report = check_results(results, baseline)
    if not report.ok:
        raise AssertionError("\n" + report.render())


def make_record(model: str = "tiny:vit", variant: str = "exact:impl=sdpa", task: str = "fidelity:images", *,
                metrics: Mapping[str, float] | None = None, primary_metric: str | None = None,
                higher_is_better: Mapping[str, bool] | None = None, variant_short: str | None = None,
                gflops: float | None = None, attention_gflops: float | None = None,
                median_s: float | None = None, batch_size: int = 8, image_size: int | None = 224,
                dtype: str = "float32", device: str = "cpu", limit: int | None = None, seed: int = 0,
                status: str = "ok", error: str | None = None, finished: str = "2025-01-01T00:00:10+00:00",
                environment: Mapping[str, Any] | None = None, items: Mapping[str, int] | None = None,
                proportions: Mapping[str, tuple[str, float]] | None = None,
                speedup_rounds: Sequence[float] | None = None, others_busy: float | None = None) -> dict[str, Any]:
    """A schema-valid record built by hand (id from the cell identity, as the runner names it), for tests.

    ``gflops`` / ``attention_gflops`` become integer FLOP counts; ``median_s`` becomes a timing block,
    with ``speedup_rounds`` (paired per-round ratios vs exact) and ``others_busy`` (cores other processes
    used while timing) when given.
    """
    settings = {"image_size": image_size, "dtype": dtype, "device": device, "batch_size": batch_size,
                "limit": limit, "seed": seed}
    metrics = dict(metrics or {}) if status == "ok" else {}
    if primary_metric is None and metrics:
        primary_metric = next(iter(metrics))
    flops = None
    if gflops is not None and status == "ok":
        total = round(gflops * 1e9)
        attention = round((attention_gflops if attention_gflops is not None else 0.0) * 1e9)
        flops = {"total": total, "attention": attention, "gflops": total / 1e9, "attention_gflops": attention / 1e9,
                 "input_shape": [1, 3, image_size or 224, image_size or 224]}
    timing = None
    if median_s is not None and status == "ok":
        timing = {"median_s": median_s, "q1_s": median_s * 0.98, "q3_s": median_s * 1.02, "min_s": median_s * 0.95,
                  "max_s": median_s * 1.1, "repeats": 5, "batch_size": batch_size,
                  "images_per_s": batch_size / median_s, "device": device, "others_busy_cores": others_busy}
        if speedup_rounds is not None:
            timing["speedup_rounds"] = [float(r) for r in speedup_rounds]
            timing["repeats"] = len(speedup_rounds)
    env = {"python": "3.11.7", "platform": "Linux-test", "device": device, "device_name": "test-cpu",
           "versions": {"fnabench": "0.1.0", "torch": "2.4.0"}, "git_revision": "abc1234"}
    env.update(environment or {})
    record = build_record(
        model=model, variant=variant, variant_short=variant_short or ("exact" if is_exact(variant) else variant),
        task=task, settings=settings, status=status, metrics=metrics, primary_metric=primary_metric,
        higher_is_better=dict(higher_is_better) if higher_is_better is not None else {m: True for m in metrics},
        flops=flops, timing=timing, environment=env, seed=seed, started="2025-01-01T00:00:00+00:00",
        finished=finished, duration_s=10.0, error=error if status != "ok" else None)
    if items is not None:
        record["items"] = dict(items)
        record["proportions"] = {m: [over, float(scale)] for m, (over, scale) in (proportions or {}).items()}
    return validate(record)
