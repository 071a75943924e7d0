"""``fnabench tune MODEL TASK --budget B``: the cheapest FNA setting whose accuracy stays within B of exact.

FNA's knobs (landmarks ``m``, which blocks, landmark selection, inverse) span a grid too large to run
a real task on every point. Counted GFLOPs cost nothing to know, so tune

1. counts the GFLOPs of every setting of the grid and drops those that cost as much as exact attention;
2. runs a cheap proxy on the rest (``fidelity:images`` on a few images: how far each setting moves the
   model's features), which gives the proxy's accuracy-vs-GFLOPs front;
3. runs the real task on exact, the hand-picked default (``fna:m=64``), then bisects along the proxy
   front for the cheapest setting within the budget, and spends the cells left on the rest of the
   proxy front between that setting and exact (widest gap in GFLOPs first), which maps the task's
   accuracy-vs-GFLOPs front inside the budget.

Every evaluated point is an ordinary record in the results folder, so ``leaderboard``, ``check`` and
``publish`` work on it, and a second run of the same command resumes: the search is a function of the
records, so it replays what is done and continues. ``RESULTS/tune.toml`` holds the settings (a rerun
with others is refused) and ``RESULTS/description.md`` the report, which ``publish`` shows.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fnabench._errors import UserError
from fnabench._io import toml_value as _toml
from fnabench.adapters import patch
from fnabench.harness import records as rec
from fnabench.harness.compare import pareto_front
from fnabench.harness.config import SweepConfig, tomllib
from fnabench.harness.config import validate as validate_config
from fnabench.harness.runner import Runner, cells
from fnabench.harness.tune_report import _label, render_report
from fnabench.measure import count_flops
from fnabench.models.registry import is_causal_model
from fnabench.patching.core import find_blocks
from fnabench.tasks.registry import make_task
from fnabench.variants import SpecError, parse_variant
from fnabench.variants.presets import expand_variant
from fnabench.variants.spec import COMPONENTS

TUNE_FILE = "tune.toml"
REPORT_FILE = "description.md"
DEFAULT_VARIANT = "fna:m=64"
DEFAULT_PROXY = "fidelity:images"
DEFAULT_M = (16, 32, 64, 128)
EXACT = "exact"


class TuneError(UserError, ValueError):
    """A tune that cannot run as asked; one line naming what is wrong and what is accepted."""


@dataclass
class TuneSpec:
    """What a tune searches and how: everything ``RESULTS/tune.toml`` holds."""

    model: str
    task: str
    budget: float = 1.0
    max_cells: int = 12  # task cells, exact and the default included
    image_size: int | None = None
    proxy: str = DEFAULT_PROXY
    proxy_images: int = 8
    m: list[int] = field(default_factory=lambda: list(DEFAULT_M))
    blocks: list[str] = field(default_factory=list)  # "all" or how many of the last blocks; [] = by depth
    landmarks: list[str] = field(default_factory=list)  # [] = fps, random (decoders: stride, random)
    pinv: list[str] = field(default_factory=lambda: ["ridge", "newton"])
    default: str = DEFAULT_VARIANT
    task_options: dict[str, Any] = field(default_factory=dict)
    limit: int | None = None  # the task's sweep limit (a task's own `limit` option wins)
    batch_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    timing_repeats: int = 2
    seed: int = 0
    offline: bool = True

    # -- the grid ---------------------------------------------------------------------------
    def layers(self) -> list[str]:
        return [":" if b == "all" else f"-{b}:" for b in self.blocks]

    def grid(self) -> list[str]:
        """Every FNA spec of the search, in canonical form (decoders: the causal form), duplicates removed."""
        out: list[str] = []
        for m in self.m:
            for layers in self.layers():
                for landmarks in self.landmarks:
                    for pinv in self.pinv:
                        spec = canonical(f"fna:m={m},layers={layers},landmarks={landmarks},pinv={pinv}", self.model)
                        if spec not in out:
                            out.append(spec)
        return out

    # -- identity and file --------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What must match for a rerun to resume this tune (``max_cells`` may grow; timing may change)."""
        return {k: v for k, v in asdict(self).items() if k not in ("max_cells", "timing_repeats")}

    def to_toml(self) -> str:
        lines = ["# fnabench tune: the search that made the records beside this file (fnabench.harness.tune)",
                 f"description = {_toml(self.description())}"]
        for key, value in asdict(self).items():
            if value is None or isinstance(value, dict):
                continue
            lines.append(f"{key} = {_toml(value)}")
        if self.task_options:
            lines += ["", "[task_options]"] + [f"{k} = {_toml(v)}" for k, v in sorted(self.task_options.items())]
        return "\n".join(lines) + "\n"

    def description(self) -> str:
        return (f"`fnabench tune` of FNA on {self.model}, task {self.task}: the cheapest setting whose "
                f"{self.task} score stays within {self.budget:g} of exact attention, searched with "
                f"{self.proxy} on {self.proxy_images} images as the proxy. Every row below is an ordinary "
                "record; the report above the tables is rebuilt from them.")


def load_spec(path: str | Path) -> TuneSpec:
    """A :class:`TuneSpec` from a ``tune.toml``."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as err:
        raise TuneError(f"{path}: invalid TOML ({err})") from None
    data.pop("description", None)
    known = set(TuneSpec.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise TuneError(f"{path}: unknown key {unknown[0]!r}; accepted: {', '.join(sorted(known))}")
    return TuneSpec(**data)


def canonical(spec: str, model: str) -> str:

    variant = parse_variant(expand_variant(spec))
    return (variant.for_causal() if is_causal_model(model) else variant).canonical


# ---------------------------------------------------------------------------------------------
# validation (before any work)


def _fna_choices(key: str) -> list[str]:
    return [c.strip() for c in COMPONENTS["fna"][key].accepts.split("|")]


def validate(spec: TuneSpec) -> TuneSpec:
    """Every name and value checked now, one line each: the sweep-level ones by the sweep config's own checks."""

    if not (isinstance(spec.budget, (int, float)) and math.isfinite(spec.budget) and spec.budget >= 0):
        raise TuneError(f"--budget {spec.budget!r}: accepted: a number >= 0, in the task's primary metric's units "
                        "(e.g. 1.0 = one point of top-1 %)")
    if spec.max_cells < 2:
        raise TuneError(f"--max-cells {spec.max_cells}: accepted: an integer >= 2 (exact and the default are "
                        "always evaluated on the task)")
    if spec.proxy_images < 1:
        raise TuneError(f"--proxy-images {spec.proxy_images}: accepted: an integer >= 1")
    if spec.proxy == spec.task:
        raise TuneError(f"--proxy {spec.proxy!r} is the task itself; accepted: a cheaper task, e.g. fidelity:images")
    if not spec.m or any(not isinstance(m, int) or m < 1 for m in spec.m):
        raise TuneError(f"--m {','.join(map(str, spec.m))}: accepted: integers >= 1 (landmarks), e.g. 16,32,64")
    for b in spec.blocks:
        if b != "all" and not (b.isdigit() and int(b) >= 1):
            raise TuneError(f"--blocks {b!r}: accepted: 'all' or a number >= 1 of last blocks, e.g. all,9,6,3")
    causal = is_causal_model(spec.model)
    if not spec.landmarks:
        spec.landmarks = ["stride", "random"] if causal else ["fps", "random"]
    for key, values in (("landmarks", spec.landmarks), ("pinv", spec.pinv)):
        accepted = _fna_choices(key)
        bad = [v for v in values if v not in accepted]
        if bad or not values:
            raise TuneError(f"--{key} {bad[0] if bad else ''!r}: accepted: {', '.join(accepted)}")
    try:
        canonical(spec.default, spec.model)  # any variant may be the point to compare with (e.g. a paper preset)
    except SpecError as err:
        raise TuneError(f"--default: {err}") from None
    _sweep(spec, [EXACT], spec.proxy, spec.proxy_images, {}, Path("."))  # model, tasks, options, device, dtype
    _sweep(spec, [EXACT], spec.task, spec.limit, spec.task_options, Path("."))
    return spec


def _sweep(spec: TuneSpec, variants: list[str], task: str, limit: int | None, options: dict, out: Path):
    """The sweep config of one tune step (validated like any config: a bad name is one line).

    Proxy cells are timed in one round without warm-up: their speed is not what they are for, and timing
    would otherwise cost more than the proxy itself (timing is not part of a cell's identity).
    """

    proxy = task == spec.proxy
    config = SweepConfig(name="tune", models=[spec.model], variants=variants, tasks=[task],
                         image_sizes=[spec.image_size], seeds=[spec.seed], batch_size=spec.batch_size,
                         device=spec.device, dtype=spec.dtype, limit=limit,
                         timing_repeats=1 if proxy else spec.timing_repeats, timing_warmup=0 if proxy else 1,
                         offline=spec.offline, out=str(out), task_options={task: dict(options)} if options else {})
    return validate_config(config)


# ---------------------------------------------------------------------------------------------
# the search


@dataclass
class Point:
    """One setting: its counted GFLOPs, proxy score and task score (None until run; NaN for a failed cell)."""

    variant: str
    gflops: float
    proxy: float | None = None
    task: float | None = None
    record: dict | None = None


@dataclass
class State:
    """What the records say so far, and the rule that picks the next task cell from it."""

    points: dict[str, Point]
    exact: str
    default: str
    budget: float
    higher: bool  # the task's primary metric: higher is better
    proxy_higher: bool

    def drop(self, p: Point) -> float | None:
        ref = self.points[self.exact].task
        if p.task is None or ref is None or math.isnan(p.task) or math.isnan(ref):
            return None
        return (ref - p.task) if self.higher else (p.task - ref)

    def within(self, p: Point) -> bool:
        drop = self.drop(p)
        return drop is not None and drop <= self.budget + 1e-12

    def candidates(self) -> list[Point]:
        """Settings cheaper than exact with a proxy score: what the task stage chooses from."""
        cap = self.points[self.exact].gflops
        return [p for v, p in self.points.items()
                if v != self.exact and p.gflops < cap and p.proxy is not None and not math.isnan(p.proxy)]

    def proxy_front(self) -> list[Point]:
        """The candidates no cheaper-or-equal candidate beats on the proxy, cheapest first."""
        cands = self.candidates()
        on = pareto_front([(p.gflops, p.proxy) for p in cands], self.proxy_higher)
        return sorted((p for p, keep in zip(cands, on, strict=True) if keep), key=lambda p: (p.gflops, p.variant))

    def best(self) -> Point | None:
        """The cheapest setting evaluated on the task within the budget (exact is, by definition)."""
        ok = [p for p in self.points.values() if p.task is not None and self.within(p)]
        return min(ok, key=lambda p: (p.gflops, p.variant)) if ok else None

    def next(self) -> tuple[Point, str] | None:
        """The next setting to run the task on, and why; None when the search has nothing left to try."""
        for name in (self.exact, self.default):
            if self.points[name].task is None:
                return self.points[name], "reference" if name == self.exact else "the hand-picked default"
        best = self.best()
        if best is None:
            return None
        misses = [p for p in self.points.values() if p.task is not None and not self.within(p)]
        front = self.proxy_front()
        floor = max((p.gflops for p in misses if p in front), default=-math.inf)
        span = [p for p in front if floor < p.gflops < best.gflops and p.task is None]
        if span:
            return span[(len(span) - 1) // 2], "bisection along the proxy front"
        # the cheapest is found: map the front between it and exact, widest gap in GFLOPs first
        done = [p.gflops for p in self.evaluated()]
        rest = [p for p in front if best.gflops < p.gflops and p.task is None]
        if not rest:
            return None
        return max(rest, key=lambda p: (min(abs(p.gflops - g) for g in done), -p.gflops, p.variant)), \
            "the proxy front between the cheapest within the budget and exact"

    def evaluated(self) -> list[Point]:
        return [p for p in self.points.values() if p.task is not None]


class _Session:
    """One tune: the model loaded once for every step, records read back after each."""

    def __init__(self, spec: TuneSpec, out: Path, *, quiet: bool, log: Callable[[str], None]) -> None:
        self.spec, self.out, self.quiet, self.log = spec, out, quiet, log
        self._models: dict[tuple, Any] = {}

    def runner(self, config):
        models = self._models

        class _Cached(Runner):
            def _load(self, name, size):
                key = (name, size)
                if key not in models:
                    models[key] = Runner._load(self, name, size)
                return models[key]

        return _Cached(config, quiet=self.quiet, log=self.log)

    def run(self, variants: list[str], task: str, limit: int | None, options: dict):
        config = _sweep(self.spec, variants, task, limit, options, self.out)
        return self.runner(config).run()

    def cell_ids(self, variants: list[str], task: str, limit: int | None, options: dict) -> dict[str, str]:
        config = _sweep(self.spec, variants, task, limit, options, self.out)
        return {c.id: c.variant for c in cells(config)}


def _primary(records: list[dict], fallback_task: str, options: dict) -> tuple[str, bool]:
    for r in records:
        if r["status"] == "ok" and r["primary_metric"]:
            return r["primary_metric"], bool(r["higher_is_better"].get(r["primary_metric"], True))

    task = make_task(fallback_task, options)
    return task.primary, bool(task.higher_is_better.get(task.primary, True))


def state_from_records(spec: TuneSpec, records: list[dict]) -> tuple[State, dict]:
    """The search state the records of a tune give (no model needed): used to search and to report."""
    def ids(task: str, limit: int | None, options: dict) -> dict[str, str]:
        config = _sweep(spec, [EXACT, spec.default, *spec.grid()], task, limit, options, Path("."))
        return {c.id: c.variant for c in cells(config)}

    by_id = {r["id"]: r for r in rec.latest_by_cell(records)}
    proxy_ids, task_ids = ids(spec.proxy, spec.proxy_images, {}), ids(spec.task, spec.limit, spec.task_options)
    proxy_recs = {v: by_id[i] for i, v in proxy_ids.items() if i in by_id}
    task_recs = {v: by_id[i] for i, v in task_ids.items() if i in by_id}
    proxy_metric, proxy_higher = _primary(list(proxy_recs.values()), spec.proxy, {})
    task_metric, higher = _primary(list(task_recs.values()), spec.task, spec.task_options)
    points: dict[str, Point] = {}
    for variant in dict.fromkeys([*proxy_ids.values(), *task_ids.values()]):
        r = proxy_recs.get(variant) or task_recs.get(variant)
        if r is None or not r.get("flops"):
            continue
        p = Point(variant, float(r["flops"]["gflops"]))
        if variant in proxy_recs:
            pr = proxy_recs[variant]
            p.proxy = float(pr["metrics"][proxy_metric]) if pr["status"] == "ok" else math.nan
        if variant in task_recs:
            tr = task_recs[variant]
            p.task = float(tr["metrics"][task_metric]) if tr["status"] == "ok" else math.nan
            p.record = tr
        points[variant] = p
    exact, default = canonical(EXACT, spec.model), canonical(spec.default, spec.model)
    state = State(points, exact, default, spec.budget, higher, proxy_higher)
    return state, {"task_metric": task_metric, "proxy_metric": proxy_metric}


@dataclass
class TuneOutcome:
    spec: TuneSpec
    state: State
    report: str
    stopped: str  # why the search ended


def _resolve_blocks(spec: TuneSpec, loaded) -> None:
    depth = len(find_blocks(loaded.model, "image")) or len(find_blocks(loaded.model, "text"))
    if not spec.blocks:
        spec.blocks = ["all"] + [str(k) for k in dict.fromkeys((depth * 3 // 4, depth // 2, depth // 4)) if k >= 1]
    for b in spec.blocks:
        if b != "all" and int(b) > depth:
            raise TuneError(f"--blocks {b}: {spec.model} has {depth} blocks; accepted: 'all' or 1 to {depth}")


def _check_resume(spec: TuneSpec, out: Path) -> None:
    path = out / TUNE_FILE
    if not path.is_file():
        return
    old = load_spec(path)
    if not old.blocks:
        return
    if not spec.blocks:
        spec.blocks = list(old.blocks)
    mine, theirs = spec.identity(), old.identity()
    diff = [k for k in mine if mine[k] != theirs.get(k)]
    if diff:
        held = ", ".join(f"{k} = {theirs.get(k)!r}" for k in diff)
        raise TuneError(f"{out} holds a tune with other settings ({held});"
                        " accepted: the same settings to resume it (only --max-cells and --timing-repeats may "
                        "change), or another --out")


def tune(spec: TuneSpec, out: str | Path, *, quiet: bool = False,
         log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> TuneOutcome:
    """Run (or resume) the search of ``spec`` into the results folder ``out``; see the module docstring."""
    import torch


    out = Path(out)
    validate(spec)
    rec.output_path(out, "results folder", folder=True, create=False)
    _check_resume(spec, out)
    session = _Session(spec, out, quiet=quiet, log=log)
    probe = _sweep(spec, [EXACT], spec.proxy, spec.proxy_images, {}, out)
    loaded = session.runner(probe)._load(spec.model, spec.image_size)
    _resolve_blocks(spec, loaded)
    exact, default = canonical(EXACT, spec.model), canonical(spec.default, spec.model)
    grid = spec.grid()
    variants = list(dict.fromkeys([exact, default, *grid]))
    # the runner's preflight for every setting (layer ranges, image size) before anything is written
    checker = session.runner(_sweep(spec, variants, spec.proxy, spec.proxy_images, {}, out))
    groups = {(spec.model, spec.image_size): cells(checker.config)}
    checker.preflight(groups)
    rec.output_path(out, "results folder", folder=True)
    rec.write_text_atomic(out / TUNE_FILE, spec.to_toml())

    # 1. counted GFLOPs of every setting on one input of the proxy task: what is cheaper than exact?
    settings = checker._settings(next(iter(groups.values()))[0], lambda it, desc, total: it)
    task = make_task(spec.proxy)
    torch.manual_seed(spec.seed)
    one = task.example_batch(task.prepare(loaded, settings), settings)[:1].to(settings.device, settings.dtype)
    gflops = {}
    for variant in variants:
        with patch(loaded.model, variant):
            gflops[variant] = count_flops(loaded.embed, one).total / 1e9
    cheap = [v for v in grid if gflops[v] < gflops[exact]]
    log(f"tune: {len(grid)} settings, {len(cheap)} cheaper than exact ({gflops[exact]:.3g} GFLOPs); "
        f"proxy {spec.proxy} on {spec.proxy_images} images")

    # 2. the proxy on every cheap setting (and the two references)
    session.run(list(dict.fromkeys([exact, default, *cheap])), spec.proxy, spec.proxy_images, {})

    # 3. the task: references, then bisection along the proxy front, then the promising rest
    stopped = "no setting left that could beat the best so far"
    while True:
        state, _ = state_from_records(spec, rec.read_records(out, strict=False))
        used = len(state.evaluated())
        if state.points.get(exact) is not None and state.points[exact].task is not None \
                and math.isnan(state.points[exact].task):
            stopped = "the exact reference cell failed on the task (see its record), so no drop can be measured"
            break
        if used >= spec.max_cells:
            stopped = f"--max-cells {spec.max_cells} task cells used"
            break
        step = state.next()
        if step is None:
            break
        point, why = step
        log(f"tune: task cell {used + 1}/{spec.max_cells}: {_label(point.variant, spec.model)} "
            f"({point.gflops:.4g} GFLOPs; {why})")
        summary = session.run([point.variant], spec.task, spec.limit, spec.task_options)
        if summary.elsewhere:
            stopped = f"another runner holds {point.variant} on the task; run the same command again to continue"
            break
    state, names = state_from_records(spec, rec.read_records(out, strict=False))
    report = render_report(spec, state, names)
    rec.write_text_atomic(out / REPORT_FILE, report)
    log(f"tune: stopped: {stopped}")
    return TuneOutcome(spec, state, report, stopped)


# ---------------------------------------------------------------------------------------------
# the report










# ---------------------------------------------------------------------------------------------
# the command












