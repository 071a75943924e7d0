"""Markdown tables: per-run emergence points with their spread, the OOD-probe table, token-swap patching and
pruned circuits.

Every cross-seed summary (the emergence spread, the OOD and patching medians, the circuits' spread) is over the
*finished* runs only, those whose last checkpoint is at their configured training steps (``finished`` in each
run's records, :func:`fnabench.tasks.recall.run_results.run_progress`), and says so when a run is left out
("median over 4 finished seeds of 5"); an unfinished run keeps its own rows, marked. When no run is finished
the summary is over all of them, and says that none is."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from fnabench.tasks.recall.metrics import emergence_point
from fnabench.tasks.recall.run_config import to_toml

#: the files :func:`report_files` makes beside a leaderboard's table (``dynamics.png`` and ``emergence.png`` need
#: the run directories: the records hold no curve over checkpoints)
REPORT_FILES = ("emergence.md", "ood.md", "preset.toml")
#: made too when the records hold token-swap patching / pruned circuits (their pictures need the run directories)
INTERVENTION_FILES = ("patching.md", "circuits.md")

PROBE_TITLES = {
    "none": "recall query (in distribution)",
    "misdirected": "misdirected label (another system's label, needle's payload)",
    "sync": "synchronized observation (all systems pass through the resumed state)",
    "unseen_label": "unseen label (needle's payload)",
    "unseen_system": "unseen label and unseen system",
}


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _is_finished(progress: dict | None) -> bool:
    """A run without progress information (one run dir's table outside a report) counts as finished."""
    return progress is None or bool(progress["finished"])


def _unfinished_mark(progress: dict | None) -> str:
    if _is_finished(progress):
        return ""
    return f" (unfinished: step {progress['steps_done']:,} of {progress['steps_planned']:,})"


def summary_scope(progress: Sequence[dict | None]) -> tuple[list[int], str | None]:
    """Which runs a cross-seed summary covers, by index: the finished ones (all of them when none is); and how to
    say it when that is not simply every run: ``"4 finished seeds of 5"``, ``"2 seeds, none finished"``."""
    done = [i for i, p in enumerate(progress) if _is_finished(p)]
    if len(done) == len(progress):
        return done, None
    if done:
        return done, f"{len(done)} finished {'seed' if len(done) == 1 else 'seeds'} of {len(progress)}"
    return list(range(len(progress))), f"{_plural(len(progress), 'seed')}, none finished"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def emergence_table(runs: Sequence[tuple]) -> str:
    """Rows (label, eval summary, costs[, configured training steps, or the run's progress: {finished,
    steps_done, steps_planned}]): when k=1 and k=2 emerge (examples, GFLOPs), their ratio, final errors, then a
    spread row (min / median / max) over the finished runs. A run whose last checkpoint is before its configured
    steps is marked unfinished (its "never" may only mean "not yet") and left out of the spread."""
    header = ["run", "params", "k=2 emerges (examples)", "k=2 (train GFLOPs)", "k=1 emerges (examples)",
              "k=1 (train GFLOPs)", "k=1 ÷ k=2", "final k=1 err", "final k=2 err", "zero pred.",
              "examples trained", "train time (s)"]
    rows, k1s, k2s, ratios, unfinished, progress = [], [], [], [], [], []
    sustained = any(run[1]["emergence"]["1"].get("rule") == "sustained" for run in runs)
    for label, summary, costs, *planned in runs:
        e1, e2 = summary["emergence"]["1"], summary["emergence"]["2"]
        x1, x2 = emergence_point(e1), emergence_point(e2)
        ratio = x1 / x2 if x1 and x2 else None
        k1s.append(x1)
        k2s.append(x2)
        ratios.append(ratio)
        rows.append([
            label, f"{costs.get('parameters', 0):,}", _point(e2), _num(_g(emergence_point(e2, "flops"))),
            _point(e1), _num(_g(emergence_point(e1, "flops"))), _num(ratio, 2),
            _num(summary["model"]["final"]["1"]["median"][-1]), _num(summary["model"]["final"]["2"]["median"][-1]),
            _num(summary["zero"]["final"]["1"]["median"]), f"{summary['examples'][-1]:,}",
            f"{summary['seconds'][-1]:.0f}",
        ])
        given = planned[0] if planned else None
        if isinstance(given, int):
            step = summary["steps"][-1]
            given = {"finished": step >= given, "steps_done": step, "steps_planned": given}
        progress.append(given)
        if not _is_finished(given):
            rows[-1][-2] += _unfinished_mark(given)
            unfinished.append(label)
    used, scope = summary_scope(progress)
    if len(used) > 1:
        title = "**spread** (min / median / max)" if scope is None else f"**spread** over {scope} (min / median / max)"
        rows.append([title, "", _spread([k2s[i] for i in used], count=True), "",
                     _spread([k1s[i] for i in used], count=True), "", _spread([ratios[i] for i in used]), "", "", "",
                     "", ""])
    if sustained:
        note = ("Emergence (sustained): the checkpoint from which the median error (over examples, of the median over "
                "traces) at k observations after the query's open label stays below half the zero predictor's to the "
                "end of the run (in brackets: the first checkpoint below it). ")
    else:
        note = ("Emergence: the first checkpoint whose median error (over examples, of the median over traces) at k "
                "observations after the query's open label is below half the zero predictor's (in brackets: the "
                "checkpoint from which it stays below). ")
    note += "GFLOPs count forward + backward of every training step (2 × multiply-adds).\n\n"
    text = note + _table(header, rows)
    if unfinished:
        text += (f"\n**Unfinished:** {', '.join(unfinished)} stopped before the configured training steps; a k "
                 "that has not emerged there may still emerge, and a sustained point may still move."
                 + _left_out(len(used), len(runs), "the spread row") + "\n")
    return text


def _left_out(used: int, total: int, what: str) -> str:
    """The sentence after the list of unfinished runs: what the cross-seed summary covers instead."""
    if used == total:
        return f" No run is finished, so {what} is over all {total}." if total > 1 else ""
    they = "It is" if total - used == 1 else "They are"
    if used > 1:
        return f" {they} left out of {what}, which is over the {used} finished seeds of {total}."
    return f" {they} left out of the cross-seed summaries, and with {used} finished seed of {total} there is no " \
           f"{what.removeprefix('the ')}."


def _g(flops: int | None) -> float | None:
    return None if flops is None else flops / 1e9


def _point(e: dict) -> str:
    """The emergence point, and the other crossing when it differs (the later stay-below point under the first
    rule, the first crossing under the sustained rule)."""
    if e.get("rule") == "sustained":
        text = _count(e["stable_examples"])
        if e["examples"] is not None and e["examples"] != e["stable_examples"]:
            text += f" (first below at {_count(e['examples'])})"
        return text
    text = _count(e["examples"])
    if e["examples"] is not None and e["stable_examples"] not in (None, e["examples"]):
        text += f" (stays below from {_count(e['stable_examples'])})"
    return text


def _count(value: int | None) -> str:
    return "never" if value is None else f"{int(value):,}"


def _spread(values: Sequence[float | None], count: bool = False, missing_as: str = "never") -> str:
    known = [v for v in values if v is not None]
    missing = len(values) - len(known)
    if not known:
        return missing_as
    text = " / ".join((_count(v) if float(v).is_integer() else f"{v:,.1f}") if count else _num(v)
                      for v in (min(known), statistics.median(known), max(known)))
    return text + (f" ({missing} {missing_as})" if missing else "")


def ood_table(runs: Sequence[tuple], ks: Sequence[str] | None = None) -> str:
    """Rows = probes; per k the median over the finished runs of each run's median error [min–max over them],
    with the zero and least-squares (system known) references at the same k. ``runs``: (label, {probe:
    summary}[, progress]) as :func:`emergence_table` takes progress; an unfinished run is named, not summarised."""
    used, scope = summary_scope([run[2] if len(run) > 2 else None for run in runs])
    left_out = [run[0] for i, run in enumerate(runs) if i not in used]
    runs = [runs[i] for i in used]
    probes = list(runs[0][1])
    first = next(s for s in runs[0][1].values() if "model" in s)
    ks = [k for k in (ks or first["model"]["final"]) if k in first["model"]["final"]]
    header = ["probe"] + [f"k={k} model" for k in ks] + [f"k={k} zero / LS" for k in ks[:2]]
    rows = []
    for probe in probes:
        summaries = [r[1][probe] for r in runs]
        if any("model" not in s for s in summaries):
            rows.append([PROBE_TITLES.get(probe, probe)] + ["skipped"] * (len(header) - 1))
            continue
        row = [PROBE_TITLES.get(probe, probe)]
        for k in ks:
            values = [s["model"]["final"][k]["median"][-1] for s in summaries]
            cell = _num(statistics.median(values))
            if len(values) > 1:
                cell += f" [{_num(min(values))}–{_num(max(values))}]"
            row.append(cell)
        for k in ks[:2]:
            row.append(f"{_num(summaries[0]['zero']['final'][k]['median'])} / "
                       f"{_num(summaries[0]['ls']['final'][k]['median'])}")
        rows.append(row)
    steps = sorted({next(s for s in run[1].values() if "model" in s)["steps"][-1] for run in runs})
    where = f"step {steps[0]}" if len(steps) == 1 else "steps " + ", ".join(str(s) for s in steps)
    over = f"{len(runs)} run(s)" if scope is None else scope
    unfinished = f" (unfinished, not summarised: {', '.join(left_out)})" if left_out else ""
    note = (f"Median squared error k observations after the query's open label at the last checkpoint "
            f"({where}); median over {over}{unfinished} [min–max]. LS = in-context least squares told which "
            "system the payload belongs to.\n\n")
    return note + _table(header, rows)


def report_files(runs: Sequence[dict]) -> dict[str, str]:
    """``emergence.md``, ``ood.md`` and ``preset.toml`` (the first run's config, every run's seed) of runs as
    :func:`fnabench.tasks.recall.run_results.runs_from_records` gives them."""
    seeds = ", ".join(str(run["config"].train.seed) for run in runs)
    first = runs[0]["config"]
    files = {
        "emergence.md": emergence_table([(run["label"], run["summary"], run["costs"], _progress(run))
                                         for run in runs]),
        "ood.md": ood_table([(run["label"], run["probes"], _progress(run)) for run in runs]),
        "preset.toml": to_toml(first, f"recall preset {first.preset!r}; seeds {seeds}"),
    }
    patched = [(run["label"], run["patching"], _progress(run)) for run in runs if run.get("patching")]
    if patched:
        used, scope = summary_scope([p for _, _, p in patched])
        summarised = [patched[i][:2] for i in used]
        over = None
        if scope is not None:
            left_out = ", ".join(label for i, (label, _, _) in enumerate(patched) if i not in used)
            over = (f" — median over {scope} [min–max]" if len(summarised) > 1 else
                    f" — {scope} ({summarised[0][0]})") + (f"; unfinished, in the per-run tables only: {left_out}"
                                                           if left_out else "")
        text = patching_table(summarised[0][1], summarised, over=over)
        text += "\nPer run:\n" + "".join(f"\n### {label}{_unfinished_mark(progress)}\n\n"
                                         + patching_table(rows).split("\n", 1)[1] for label, rows, progress in patched)
        files["patching.md"] = text
    sparsities = sorted({s for run in runs for s in run.get("circuits", {})})
    if sparsities:
        files["circuits.md"] = "\n".join(
            circuit_table([(run["label"], run["circuits"][s], _progress(run)) for run in runs
                           if s in run.get("circuits", {})])
            for s in sparsities)
    return files


def _progress(run: dict) -> dict | None:
    """A run's ``finished`` / ``steps_done`` / ``steps_planned`` (None when the run dict has none)."""
    if "finished" not in run:
        return None
    return {key: run[key] for key in ("finished", "steps_done", "steps_planned")}


CIRCUIT_TITLES = {"k1": "k1 (recall; label swapped)", "k2": "k2 (continuation; observation swapped)"}
_SWAP_OF = {"k1": "label", "k2": "observation"}


def _errs(score: dict) -> str:
    return f"{_num(score['err'])} / {_num(score['model_err'])} / {_num(score['ablated_err'])}"


def circuit_table(runs: Sequence[tuple]) -> str:
    """Per run and circuit (k1, k2 at one sparsity): edges kept, the circuit's error on its own target and on
    the other target (cross-ablation) beside the full model's and the fully ablated run's, the share of the
    ablation's damage it recovers; then per run the two edge sets' overlap beside each circuit's edges kept and
    recovered share, and a spread row (min / median / max) over the finished runs when there are two or more.
    ``runs``: (label, {target: circuit}[, progress]) as :func:`emergence_table` takes progress."""
    header = ["run", "circuit", "edges kept", "own target: err circuit / model / ablated", "recovered",
              "other target: err circuit / model / ablated", "recovered", "k2 with the label swapped: err"]
    rows, overlaps, columns = [], [], []
    progress = [run[2] if len(run) > 2 else None for run in runs]
    for (label, circuits, *_), mark in zip(runs, (_unfinished_mark(p) for p in progress), strict=True):
        label += mark
        for target, c in circuits.items():
            other = "k2" if target == "k1" else "k1"
            own, cross = c["scores"][target][_SWAP_OF[target]], c["scores"][other][_SWAP_OF[other]]
            label_k2 = c["scores"]["k2"]["label"]
            rows.append([label, CIRCUIT_TITLES[target], f"{c['edges_kept']} / {c['edges_total']}", _errs(own),
                         _num(own["recovered"], 2), _errs(cross), _num(cross["recovered"], 2),
                         f"{_num(label_k2['err'])} (model {_num(label_k2['model_err'])})"])
        values = _circuit_summary(circuits)
        columns.append(values)
        overlaps.append([label] + [_count(v) if i < 3 and v is not None else _num(v, 2) for i, v in
                                   enumerate(values)])
    sparsity = next(iter(runs[0][1].values()))["settings"]["sparsity"]
    note = (f"Edge pruning at target sparsity {sparsity:g}: each circuit keeps the listed edges of the disentangled "
            "residual stream; every other edge carries its writer's output from the swapped run. Errors are median "
            "squared errors against the needle's true state (median over traces, then over examples) on held-out "
            "queries; *model* is the full model, *ablated* the swapped run (every edge off). Recovered = (ablated − "
            "circuit) ÷ (ablated − model): 1 is a faithful circuit, 0 no better than the swap (— when the swap changes "
            "the error by less than 5 %). The other target is "
            "scored under its own swap (cross-ablation). The last column runs each circuit on k2 with the *label* "
            "swapped instead: a label-agnostic continuation needs no label edge.\n\n")
    text = note + _table(header, rows)
    used, scope = summary_scope(progress)
    if len(used) > 1:
        title = "**spread** (min / median / max)" if scope is None else f"**spread** over {scope} (min / median / max)"
        overlaps.append([title] + [_spread([columns[r][i] for r in used], count=i < 3, missing_as="—")
                                   for i in range(len(columns[0]))])
    text += ("\nOverlap of the two edge sets (Jaccard = shared ÷ either), beside each circuit's edges kept and the "
             "share of its own swap's damage it recovers, per run:\n\n")
    text += _table(["run", "k1 edges", "k2 edges", "shared", "Jaccard", "shared ÷ smaller", "k1 recovered",
                    "k2 recovered"], overlaps)
    unfinished = [run[0] for i, run in enumerate(runs) if not _is_finished(progress[i])]
    if unfinished:
        text += (f"\n**Unfinished:** {', '.join(unfinished)}; listed above, not summarised."
                 + _left_out(len(used), len(runs), "the spread row") + "\n")
    return text


def _circuit_summary(circuits: dict[str, dict]) -> list[float | None]:
    """k1 edges kept, k2 edges kept, shared edges, Jaccard, shared ÷ smaller, k1 and k2 recovered (own target);
    None where a circuit is missing or the swap did no damage to recover."""
    edges = {t: {tuple(e) for e in c["edges"]} for t, c in circuits.items()}
    a, b = edges.get("k1"), edges.get("k2")
    both = a is not None and b is not None
    shared = len(a & b) if both else None
    recovered = {t: c["scores"][t][_SWAP_OF[t]]["recovered"] for t, c in circuits.items()}
    return [len(a) if a is not None else None, len(b) if b is not None else None, shared,
            shared / len(a | b) if both and a | b else None,
            shared / min(len(a), len(b)) if both and a and b else None, recovered.get("k1"), recovered.get("k2")]


PATCH_COLUMNS = (("k1_needle", "k=1 vs needle"), ("k1_other", "k=1 vs other"), ("k1_donor", "k=1 vs donor"),
                 ("k2_needle", "k=2 vs needle"), ("k2_other", "k=2 vs other"), ("k2_donor", "k=2 vs donor"))
_ROW_NAMES = {"clean": "clean", "swapped": "token swapped (clean context)", "donor": "donor run"}


def patching_table(rows_by_swap: dict[str, list[dict]], runs: Sequence[tuple[str, dict[str, list[dict]]]] = (),
                   over: str | None = None) -> str:
    """Token-swap activation patching, one table per swap: the clean, token-swapped and donor runs, then the
    donor's residual stream patched into the clean run at the swapped position where each layer reads it;
    median errors at k = 1, 2 against the needle's, the other system's and the donor's states (several runs:
    median over runs [min–max]). ``over``: what the runs are, said after the title (default "median over N
    runs [min–max]" for several); :func:`report_files` passes the finished runs and says so."""
    runs = list(runs) or [("", rows_by_swap)]
    if over is None:
        over = f" — median over {len(runs)} runs [min–max]" if len(runs) > 1 else ""
    text = ("Token swap at one position (label: the query's open label becomes the next haystack system's, the "
            "*other*; observation: the first resumed observation becomes the other's state). Activation patching "
            "takes that position from a *donor*: a query from another configuration (other systems and states, the "
            "same label in every slot) re-opening the other's slot; its residual stream at the position, where "
            "layer l reads it, is written into the clean run (l = 0: the donor's token; l = L: its read-out "
            "input). Rows: the clean query, the clean context with the token swapped, the donor run, then the "
            f"patched runs. Median squared error (traces, then examples){over}.\n")
    for swap in runs[0][1]:
        rows = []
        for i, row in enumerate(runs[0][1][swap]):
            name = _ROW_NAMES.get(row["layer"], f"patched at layer {row['layer'][1:]}")
            cells = [name]
            for key, _ in PATCH_COLUMNS:
                values = [run[1][swap][i][key] for run in runs]
                cell = _num(statistics.median(values))
                if len(values) > 1:
                    cell += f" [{_num(min(values))}–{_num(max(values))}]"
                cells.append(cell)
            rows.append(cells)
        text += f"\n**{swap} swap**\n\n" + _table(["run", *(title for _, title in PATCH_COLUMNS)], rows)
    return text
