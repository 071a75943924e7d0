"""Records and leaderboards for task suites that make their own results outside ``fnabench run``.

The recall suite trains and evaluates its own models, so no sweep runs its cells; it still publishes
through the one path every leaderboard takes: the suite hands over one *result* per cell (identity,
settings, metrics and what it measured), :func:`make_record` completes it into a harness record
(schema, cell id, canonical variant, environment), :func:`store` writes the records into a results
folder, and :func:`publish_results` publishes that folder with :func:`fnabench.harness.publish.publish`.

Task suites never import the harness: the ``fnabench`` command hands this module to the suite's CLI
(``fnabench.cli.recall_cmd.HARNESS``), as ``fnabench-clip-benchmark`` hands the model loader to its adapter.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fnabench.harness import records as rec
from fnabench.harness.publish import publish
from fnabench.harness.records import RecordError, output_path, read_records, require_records
from fnabench.variants import parse_variant

__all__ = ["RESULT_FIELDS", "make_record", "output_path", "publish", "publish_results", "read_records",
           "require_records", "store"]

#: what a suite's result must give; the rest of a record has defaults (no timing, no memory, ok status)
RESULT_FIELDS = ("model", "variant", "task", "settings", "metrics", "primary_metric", "higher_is_better", "flops",
                 "seed", "started", "finished", "duration_s")
_DEFAULTS: dict[str, Any] = {"status": "ok", "timing": None, "peak_memory_bytes": None, "error": None}


def make_record(result: dict[str, Any], environment: dict[str, Any] | None = None) -> dict[str, Any]:
    """The harness record of one suite result: its fields, plus schema, cell id, canonical variant and short form,
    status ``ok``, no timing or memory unless given, and ``environment`` (default: this process's, on the
    result's device). Any other field of the result (``items``, ``proportions``, the suite's own extras) is kept.
    """
    missing = [k for k in RESULT_FIELDS if k not in result]
    if missing:
        raise RecordError(f"suite result for {result.get('model')!r} / {result.get('task')!r} lacks "
                          f"{', '.join(missing)}; accepted: a dict with {', '.join(RESULT_FIELDS)}")
    variant = parse_variant(result["variant"])
    settings = {k: result["settings"].get(k) for k in rec.IDENTITY_SETTINGS} | dict(result["settings"])
    env = environment if environment is not None else rec.environment(settings.get("device") or "cpu")
    fields = {**_DEFAULTS, **result, "variant": variant.canonical, "variant_short": variant.short,
              "settings": settings, "environment": env}
    fields.pop("schema", None), fields.pop("id", None)
    reason = rec.nonfinite_metrics(fields["metrics"], result["task"], variant.canonical)
    if reason and fields["status"] == "ok":  # a failed cell with its reason, as the runner records one
        fields.update(status="failed", metrics={}, error=reason)
    return rec.validate(rec.build_record(**fields), f"suite result {result['model']!r} / {result['task']!r}")


def store(results: Iterable[dict[str, Any]], results_dir: str | os.PathLike,
          environment: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Write each result as a record (``<id>.json``) into ``results_dir``; returns the records."""
    out = rec.output_path(results_dir, "results folder", folder=True)
    records = [make_record(r, environment) for r in results]
    for record in records:
        rec.write_record(out, record)
    return records


def publish_results(results: Iterable[dict[str, Any]], results_dir: str | os.PathLike,
                    dest_dir: str | os.PathLike, *, command: str | None = None) -> Path:
    """:func:`store` the results in ``results_dir``, then publish that folder as the leaderboard ``dest_dir``."""
    store(results, results_dir)
    return publish(Path(results_dir), dest_dir, command=command)
