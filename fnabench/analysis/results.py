"""Analyses as harness results (one per model × variant: the exact analysis and each ablation), and the
Markdown tables a leaderboard folder shows beside its README, rebuilt from those records alone.

A result has the harness's fields (``fnabench.harness.suites.RESULT_FIELDS``): model, variant (``exact`` or
the ablation's mask spec), task ``analysis:<inputs>``, settings (image size, dtype, device, batch, limit;
``options`` the thresholds and what pins the inputs down), metrics (:meth:`Report.metrics`, with
``cos_sim`` of the output against the exact run as the primary), counted FLOPs of one input's forward.
Its ``analysis`` field keeps what the tables need: the verdict, the kinds, the per-layer rows, and for an
ablation its comparison; and the command that made it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from fnabench.analysis.ablation import ABLATE_KINDS, ACTIONS
from fnabench.analysis.report import Report

PRIMARY = "cos_sim"
DIRECTIONS = {"cos_sim": True, "cos_sim_min": True}
#: the file beside the leaderboard's README
TABLES = "analysis.md"


def slug(model: str, image_size: int | None) -> str:
    """A folder name for one model (and size): ``offline:dinov2-s`` at 224 → ``offline-dinov2-s-224px``."""
    text = "".join(c if c.isalnum() or c in "-_." else "-" for c in model).strip("-")
    return f"{text}-{image_size}px" if image_size else text


def result(report: Report, *, task: str, settings: dict[str, Any], flops: dict[str, Any] | None, started: str,
           finished: str, duration_s: float, command: str, ablation=None, folder: str | None = None) -> dict[str, Any]:
    """One harness result: the exact analysis (``ablation`` None) or an ablation's after-analysis."""
    summary = (ablation.after if ablation is not None else report).summary()
    metrics = ablation.metrics() if ablation is not None else {**report.metrics(), "cos_sim": 1.0, "cos_sim_min": 1.0}
    payload: dict[str, Any] = {
        "role": "ablation" if ablation is not None else "analysis", "command": command, "folder": folder,
        **{k: summary[k] for k in ("verdict", "kinds", "layers", "num_prefix", "prefix_kinds", "grid", "causal",
                                   "tokens", "blocks", "heads", "thresholds")},
        "massive_activations": summary["massive_activations"][:10],
    }
    if ablation is not None:
        payload["ablation"] = ablation.summary()
    return {
        "model": report.model, "variant": (ablation.after if ablation is not None else report).variant, "task": task,
        "settings": settings, "metrics": metrics, "primary_metric": PRIMARY, "higher_is_better": dict(DIRECTIONS),
        "flops": flops, "seed": int(settings.get("seed") or 0), "started": started, "finished": finished,
        "duration_s": float(duration_s), "items": {"inputs": report.count, "tokens": report.tokens},
        "analysis": payload,
    }


def settings_of(report: Report, *, image_size: int | None, device: str, dtype: str, batch_size: int,
                limit: int | None, options: dict[str, Any]) -> dict[str, Any]:
    """The record settings of an analysis (what makes two analyses the same cell)."""
    thresholds = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(report.thresholds).items()}
    return {"image_size": image_size, "dtype": dtype, "device": device, "batch_size": batch_size, "limit": limit,
            "seed": 0, "options": {**thresholds, **options}}


# ---------------------------------------------------------------------------------------------- tables


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.{digits}g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _layer_table(a: dict[str, Any]) -> str:
    prefix = a["prefix_kinds"]
    own = [f"ratio_{k}{p if k == 'register' else ''}" for p, k in enumerate(prefix)] or ["ratio_first"]
    own_names = [f"{k}{f' {p}' if k == 'register' else ''} ×median" for p, k in enumerate(prefix)] or \
        ["first token ×median"]
    share = "share_prefix" if prefix else "share_first"
    header = ["state", "median norm", "max ×median (median / max over inputs)", "artifact / input",
              "massive / input", "largest \\|x\\|", *own_names,
              f"block's share on {'CLS+registers' if prefix else 'first token'}", "head-mean top sink (inputs)"]
    rows = []
    for r in a["layers"]:
        rows.append([str(r["layer"]), _num(r["median_norm"]),
                     f"{_num(r['max_ratio_median'])} / {_num(r['max_ratio'])}", _num(r["artifact_per_input"]),
                     _num(r["massive_per_input"]), _num(r["max_activation"]), *[_num(r.get(k)) for k in own],
                     _num(r.get(share)),
                     f"{r['top_sink_token']} ({r['top_sink_inputs']})" if "top_sink_token" in r else "output"])
    return _table(header, rows)


def _kinds_table(a: dict[str, Any], inputs: int) -> str:
    header = ["kind", "inputs", "per input", "positions (inputs)", "stable positions", "from state (median)",
              "max ×median", "massive-activation dims (tokens)", "max block share"]
    rows = []
    for kind, k in a["kinds"].items():
        rows.append([kind, f"{k['inputs']}/{inputs}", _num(k["per_input"]),
                     ", ".join(f"{p} ({c})" for p, c in k["positions"][:5]),
                     ", ".join(map(str, k["stable_positions"])) or "none", _num(k["first_layer_median"]),
                     _num(k["max_ratio"]), ", ".join(f"{d} ({c})" for d, c in k["activation_dims"]) or "—",
                     _num(k["max_share"])])
    return _table(header, rows) if rows else "No token is listed.\n"


def _ablation_table(ab: dict[str, Any]) -> str:
    other = ab["other"]
    header = ["state", "removed / input", "removed tokens' share before", f"{other} before", f"{other} after",
              f"newly {other}", f"norm ×, tokens {other} before", "top sink (head mean): share (token) before → after",
              "sinks on removed tokens: kept / taken over / spread", "new sinks (inputs·heads)", "new sinks were"]
    rows = []
    for r in ab["per_layer"]:
        block = "masked" in r
        rows.append([
            str(r["layer"]), _num(r.get("masked")) if block else "output",
            _num(r.get("masked_share_before")) if block else "", _num(r[f"{other}_before"]),
            _num(r[f"{other}_after"]), _num(r["emerged"]), _num(r["growth"]),
            f"{_num(r['top_share_before'])} ({r['top_sink_before']}) → {_num(r['top_share_after'])} "
            f"({r['top_sink_after']})" if block else "",
            f"{r['lost']}: {r['kept']} / {r['taken']} / {r['lost'] - r['kept'] - r['taken']}" if block else "",
            ", ".join(f"{p} ({c})" for p, c in r["new_sinks"]) if block else "",
            ", ".join(f"{k} {c}" for k, c in r["new_sink_kinds"].items()) if block else "",
        ])
    return _table(header, rows)


def tables(records: list[dict[str, Any]], figures: Callable[[dict], list[str]] | None = None) -> str:
    """``analysis.md``: per model (and settings), the verdict, the per-state table, the kinds, then each
    ablation's verdict and before/after table. ``figures(record)`` names figure files to link per record."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if not isinstance(r.get("analysis"), dict):
            continue
        s = r["settings"]
        groups.setdefault((r["model"], r["task"], s.get("image_size"), repr(s.get("options"))), []).append(r)
    lines = ["# Massive and artifact tokens", "",
             "Generated from the records by `fnabench analyze --from-records`; the criteria are in "
             "`fnabench/analysis/report.py`. A *state* is the residual stream entering that block (the last: "
             "leaving the last block); ×median is a token's norm over the median norm of the input's patch tokens "
             "(decoders: of all tokens). Shares are fractions of a block's attention mass (mean over heads, "
             "queries and inputs).", ""]
    for (model, task, size, _), group in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][2]))):
        exact = [r for r in group if r["analysis"]["role"] == "analysis"]
        ablations = sorted((r for r in group if r["analysis"]["role"] == "ablation"), key=_ablation_order)
        title = f"{model}" + (f" at {size} px" if size else "") + f" — {task}"
        lines += [f"## {title}", ""]
        for r in exact:
            a = r["analysis"]
            inputs = r["items"]["inputs"]
            lines += [f"{inputs} inputs, {a['tokens']} tokens, {a['blocks']} blocks × {a['heads']} heads"
                      + (f", prefix: {', '.join(a['prefix_kinds'])}" if a["prefix_kinds"] else "") + ".", ""]
            lines += [f"- {v}" for v in a["verdict"]] + [""]
            lines += _figure_lines(r, figures)
            lines += ["### Per residual state", "", _layer_table(a), "### Listed tokens", "",
                      _kinds_table(a, inputs)]
        for r in ablations:
            ab = r["analysis"]["ablation"]
            what = {"first": "the first token"}.get(ab["kind"], f"{ab['kind']} tokens")
            lines += [f"### Ablation: {what} removed as {ab['action']} (blocks `{ab['layers']}`)", "",
                      f"Variant `{r['variant']}`.", ""]
            lines += [f"- {v}" for v in ab["verdict"]] + [""]
            if ab["masked_layers"]:  # (an ablation that removed nothing has nothing to tabulate)
                lines += _figure_lines(r, figures)
                lines += [_ablation_table(ab)]
    return "\n".join(lines).rstrip("\n") + "\n"


def _ablation_order(record: dict) -> tuple:
    ab = record["analysis"]["ablation"]
    return (ABLATE_KINDS.index(ab["kind"]) if ab["kind"] in ABLATE_KINDS else len(ABLATE_KINDS),
            ACTIONS.index(ab["action"]) if ab["action"] in ACTIONS else len(ACTIONS), record["variant"])


def _figure_lines(record: dict, figures: Callable[[dict], list[str]] | None) -> list[str]:
    names = figures(record) if figures else []
    return [" ".join(f"[{n.rsplit('/', 1)[-1]}]({n})" for n in names), ""] if names else []


def commands(records: list[dict[str, Any]]) -> str | None:
    """The command(s) that made the records, in order of first appearance ('; '-joined)."""
    seen: dict[str, None] = {}
    for r in sorted(records, key=lambda r: r["started"]):
        command = (r.get("analysis") or {}).get("command")
        if command:
            seen[command] = None
    return "; ".join(seen) or None
