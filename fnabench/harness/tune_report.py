"""The report of a tune search (its ``description.md``): the recommended setting, the proxy and task cells it
rests on, and how the search moved."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fnabench.harness.compare import pareto_front, standard_error
from fnabench.models.registry import is_causal_model
from fnabench.variants import parse_variant

if TYPE_CHECKING:  # annotations only: tune.py imports this module
    from fnabench.harness.tune import Point, State, TuneSpec


def _fmt(x: float | None, digits: int = 4, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    x = 0.0 if x == 0 else x  # no "-0"
    return f"{x:{'+' if sign else ''}.{digits}g}"


def _label(variant: str, model: str) -> str:

    return parse_variant(variant).label(causal=is_causal_model(model))


def _short(p: Point) -> str:
    return (p.record or {}).get("variant_short") or p.variant


def render_report(spec: TuneSpec, state: State, names: dict[str, str]) -> str:
    """The tune's Markdown report from its state alone (so the published folder can be checked against its records)."""
    metric, proxy_metric = names["task_metric"], names["proxy_metric"]
    exact = state.points.get(state.exact)
    grid = spec.grid()
    cands = state.candidates()
    evaluated = sorted(state.evaluated(), key=lambda p: (p.gflops, p.variant))
    size = f" at {spec.image_size} px" if spec.image_size else ""
    lines = [f"## Tune: FNA on {spec.model}{size}, {spec.task} within {spec.budget:g} {metric} of exact", ""]
    space = (f"m ∈ {{{', '.join(map(str, spec.m))}}} × layers ∈ {{{', '.join(f'`{x}`' for x in spec.layers())}}} × "
             f"landmarks ∈ {{{', '.join(spec.landmarks)}}} × pinv ∈ {{{', '.join(spec.pinv)}}}")
    lines.append(f"**Searched:** {space}: {len(grid)} settings, {len(cands)} of them cheaper than exact in counted "
                 f"GFLOPs and scored by the proxy ({spec.proxy}, {proxy_metric}, on {spec.proxy_images} images); "
                 f"{len(evaluated)} task cells of at most {spec.max_cells} (exact and the default included).")
    lines.append("")
    if exact is None or exact.task is None or math.isnan(exact.task):
        lines += ["The exact reference has no task result yet, so nothing can be judged against the budget.", ""]
        return "\n".join(lines)
    best = state.best()
    default = state.points.get(state.default)

    def describe(p: Point) -> str:
        drop = state.drop(p)
        se = standard_error(p.record, metric) if p.record else None
        se_text = f" ± {se:.2g} s.e." if se else ""
        saving = 100 * (1 - p.gflops / exact.gflops)
        change = -drop if state.higher else drop
        return (f"`{_short(p)}`: {metric} {_fmt(p.task)}{se_text} (Δ {_fmt(change, 3, sign=True)} vs exact's "
                f"{_fmt(exact.task)}), {p.gflops:.4g} GFLOPs ({_fmt(-saving, 3, sign=True)} % vs exact's "
                f"{exact.gflops:.4g})")

    if best is not None and best.variant != state.exact:
        lines.append(f"**Cheapest setting within the budget:** {describe(best)}.")
    else:
        lines.append("**No setting cheaper than exact stayed within the budget** among those tried.")
    if default is not None and default.task is not None and not math.isnan(default.task):
        verdict = "within the budget" if state.within(default) else "outside the budget"
        lines.append(f"**Hand-picked default** {describe(default)}: {verdict}.")
        if best is not None and best.variant not in (state.exact, state.default):
            diff = best.gflops - default.gflops
            lines.append(f"Tune's pick costs {abs(diff):.3g} GFLOPs per item {'less' if diff < 0 else 'more'} "
                         f"than the default ({_fmt(100 * diff / default.gflops, 3, sign=True)} %).")
            if diff >= 0 and not state.within(default):
                lines.append("The default is cheaper but outside the budget, and no setting tried that costs as "
                             "little as the default stayed within it.")
    ses = [standard_error(p.record, metric) for p in evaluated if p.record]
    ses = [s for s in ses if s]
    if ses and spec.budget < max(ses):
        lines.append(f"Note: the budget ({spec.budget:g}) is smaller than the binomial standard error of one cell's "
                     f"{metric} (up to {max(ses):.2g}), so a single cell's call near the edge of the budget is within "
                     "noise; more test items make it sharper.")
    lines += ["", f"Every setting run on the task, cheapest first (★: on the task's {metric}-vs-GFLOPs front):", "",
              f"| setting | {metric} | Δ vs exact | within {spec.budget:g} | GFLOPs | proxy {proxy_metric} | front |",
              "|---|---|---|---|---|---|---|"]
    ok = [p for p in evaluated if not math.isnan(p.task)]
    on = dict(zip((p.variant for p in ok), pareto_front([(p.gflops, p.task) for p in ok], state.higher), strict=True))
    for p in evaluated:
        drop = state.drop(p)
        change = None if drop is None else (-drop if state.higher else drop)
        delta = "ref" if p.variant == state.exact else _fmt(change, 3, sign=True)
        mark = "yes" if state.within(p) else ("failed" if math.isnan(p.task) else "no")
        lines.append(f"| `{_short(p)}` | {_fmt(p.task)} | {delta} | {mark} | {p.gflops:.4g} | {_fmt(p.proxy)} | "
                     f"{'★' if on.get(p.variant) else ''} |")
    lines += ["", "How it searched: counted GFLOPs for every setting; the proxy on each one cheaper than exact; "
              "then the task on exact, the default, the middle of the proxy front's stretch between the cheapest miss "
              "and the cheapest setting within the budget (a bisection), and then the rest of the proxy front up "
              "to exact, widest gap in GFLOPs first. Rerun the same `fnabench tune` command to resume or extend "
              "it (`--max-cells`).", ""]
    return "\n".join(lines)
