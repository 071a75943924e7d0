"""The sweep runner: every (model, image size, task, variant, seed) cell → one record on disk.

Models load once per image size, tasks prepare once per model with exact attention, FLOPs are
counted and latency measured once per (model, variant, input shape) — tasks share them — and each
cell is written the moment it finishes. Latency is timed interleaved with exact attention on the
same batch, so each record carries a speed-up that load drifting between cells cannot skew.
A crash in one cell is recorded in that cell's record and the sweep goes on; a rerun skips cells
whose record says ``ok``. Each cell is claimed while it runs (:mod:`.claims`), so runners sharing a
results folder (two shells, or the jobs of ``--executor local|slurm``) never run the same cell twice.
"""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fnabench.adapters import UnsupportedModelError, patch
from fnabench.harness import claims
from fnabench.harness import records as rec
from fnabench.harness.compare import EXACT_REFERENCE, paired_speedup
from fnabench.harness.config import ConfigError, SweepConfig
from fnabench.measure import _sync, count_flops, measure_interleaved, peak_memory
from fnabench.models.cards import weights_of
from fnabench.models.loaded import ModelInputError, set_offline
from fnabench.models.registry import is_causal_model, load_model
from fnabench.patching.kv_cache import cache_bytes
from fnabench.tasks.base import Settings
from fnabench.tasks.registry import make_task
from fnabench.variants import SpecError, Variant, parse_variant


@dataclass
class SweepSummary:
    """What a sweep did: cells run, skipped (already done) and failed, and where records went."""

    out: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    retimed: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)  # cells another runner held, or finished meanwhile

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        retimed = f", {len(self.retimed)} retimed" if self.retimed else ""
        elsewhere = f", {len(self.elsewhere)} left to another runner" if self.elsewhere else ""
        return (f"{len(self.ran)} cells run, {len(self.skipped)} already done{retimed}{elsewhere}, "
                f"{len(self.failed)} failed; records in {self.out}")


def cells(config: SweepConfig) -> list[rec.Cell]:
    """The grid in run order: grouped by model and image size so each model loads once."""
    out = []
    for model in config.models:
        # decoders (and a multimodal model's language model): causal-safe defaults
        variants = config.canonical_variants(causal=lambda spec, model=model: is_causal_model(model, spec))
        for size in config.image_sizes:
            for task in config.tasks:
                for seed in config.seeds:
                    for variant in variants:
                        settings = {"image_size": size, "dtype": config.dtype, "device": config.device,
                                    "batch_size": config.batch_size, "limit": config.limit, "seed": seed,
                                    "options": dict(config.task_options.get(task, {}))}
                        out.append(rec.Cell(model, variant, task, tuple(sorted(settings.items()))))
    return out


def cell_label(cell: rec.Cell) -> str:
    """A cell in words, as tables name it: ``model @SIZEpx | variant | task``."""
    size, variant = cell.setting("image_size"), _short(parse_variant(cell.variant), cell.model)
    return f"{cell.model}{f' @{size}px' if size else ''} | {variant} | {cell.task}"


def _progress_factory(quiet: bool) -> Callable[[Iterable, str, int | None], Iterable]:
    if quiet:
        return lambda it, desc, total: it
    from tqdm.auto import tqdm

    return lambda it, desc, total: tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)


def stops_the_job(err: BaseException) -> bool:
    """An exception a job's scheduler raises to end the job (submitit's ``UncompletedJobError``, from its signal
    handler at a time limit it will not requeue again): it ends the job; it is not the running cell's failure."""
    return type(err).__module__.startswith("submitit")


class NonFiniteMetricError(ValueError):
    """A cell whose task returned a NaN or infinite metric: recorded as failed, never as ok."""


def _failed_record(cell: rec.Cell, started: str, t0: float, err: BaseException, env: dict) -> dict:
    text = f"{type(err).__name__}: {' '.join(str(err).split())}"
    record = _base_record(cell, started, t0, env)
    record.update(status="failed", error=text, traceback=traceback.format_exc(limit=8))
    return record


def _base_record(cell: rec.Cell, started: str, t0: float, env: dict) -> dict:
    variant = parse_variant(cell.variant)
    causal = {"causal": {"leaks_future": variant.leaks_future}} if is_causal_model(cell.model, cell.variant) else {}
    return rec.build_record(model=cell.model, variant=cell.variant, variant_short=_short(variant, cell.model),
                            task=cell.task, settings=dict(cell.settings), environment=env,
                            seed=cell.setting("seed", 0), started=started, finished=rec.now(),
                            duration_s=round(time.perf_counter() - t0, 3), **causal)


def _short(variant: Variant, model: str) -> str:
    """The table's name for a variant; in a decoder a whole-sequence selector is named and flagged."""
    return variant.label(causal=is_causal_model(model, variant.canonical))


class Runner:
    """Runs a sweep config into a results folder."""

    def __init__(self, config: SweepConfig, *, quiet: bool = False, log: Callable[[str], None] = print,
                 retime: bool = False, only: Iterable[str] | None = None,
                 stale_after: float = claims.STALE_AFTER_S) -> None:
        self.config = config
        self.quiet = quiet
        self.retime = retime
        self.log = log
        self.out = config.output_dir()
        self.only = set(only) if only is not None else None  # run just these cell ids (one job's share)
        self.stale_after = stale_after
        self._claim: claims.Claim | None = None
        self._seen: dict[str, set[tuple]] = {}  # by cell id: the runs whose records were there at the start
        self._flops: dict[tuple, dict] = {}
        self._kv: dict[tuple, dict] = {}  # decoder cells: KV cache after prefill and one decoding step
        self._timings: dict[tuple, tuple[dict, int]] = {}
        self._done: dict[str, dict] = {}

    def run(self) -> SweepSummary:
        """Run every cell without an ``ok`` record; write each record as it finishes.

        With ``retime``, cells that are done are not skipped: their latency and memory are measured
        again (metrics and FLOPs kept), e.g. on a quieter machine than the one that ran them.
        """
        config = self.config
        set_offline(config.offline)
        rec.output_path(self.out, "results folder", folder=True, create=False)
        summary = SweepSummary(self.out)
        existing = rec.read_records(self.out, strict=False) if self.out.is_dir() else []
        self._seen = {}
        for r in existing:  # a set: a folder may hold copies of a cell's record in subfolders
            self._seen.setdefault(r["id"], set()).add(_stamp(r))
        self._done = {r["id"]: r for r in existing if r["status"] == "ok"}
        grid = [c for c in cells(config) if self.only is None or c.id in self.only]
        todo = [c for c in grid if self.retime or c.id not in self._done]
        summary.skipped = [c.id for c in grid if c.id in self._done and not self.retime]
        groups: dict[tuple, list[rec.Cell]] = {}
        for cell in todo:
            groups.setdefault((cell.model, cell.setting("image_size")), []).append(cell)
        loaded = self.preflight(groups)
        rec.output_path(self.out, "results folder", folder=True)
        self._save_config()
        progress = _progress_factory(self.quiet)
        bar_iter = iter(progress(todo, f"sweep {config.name}", len(todo)))
        env = rec.environment(config.device)
        try:
            for (model_name, size), group in groups.items():
                self._run_model(model_name, size, group, env, summary, progress, bar_iter,
                                loaded.pop((model_name, size)))
        finally:
            self._release()
        return summary

    def _take(self, cell: rec.Cell, summary: SweepSummary) -> bool:
        """Claim ``cell`` for this runner; False (and the cell left alone) if another runner holds it or has
        just written its record (an ``ok`` one, or a failure other than the one this runner found: a fresh
        attempt by another runner, not one to retry)."""
        self._release()
        claim = claims.try_claim(self.out, cell.id, stale_after=self.stale_after, label=cell_label(cell))
        if claim is None:
            summary.elsewhere.append(cell.id)
            return False
        if not self.retime:
            try:
                now = rec.read_records(self.out / f"{cell.id}.json")[0]
            except (FileNotFoundError, rec.RecordError, IndexError):
                now = None
            if now is not None and (now["status"] == "ok" or _stamp(now) not in self._seen.get(cell.id, ())):
                claim.release()
                summary.elsewhere.append(cell.id)
                return False
        self._claim = claim
        return True

    def _release(self) -> None:
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    def _still_ours(self, cell_id: str) -> bool:
        """Whether this runner still holds the claim on ``cell_id`` (one frozen past ``stale_after`` lost it)."""
        if self._claim is None or self._claim.holds():
            return True
        self.log(f"claim on cell {cell_id} was taken over by another runner (this one looked dead); "
                 "its result is dropped, the other runner's record stands")
        return False

    def preflight(self, groups: dict[tuple, list[rec.Cell]]) -> dict[tuple, Any]:
        """Before any cell runs or anything is written: load every (model, image size) of the sweep and
        refuse, with a :class:`ConfigError`, an image size the model cannot take or a variant whose
        layers select none of its blocks.

        Returns, per group, the model loaded for the first group (reused, so it loads once) or the
        exception a load raised (the group's cells record it: missing weights are not a config mistake).
        """
        out: dict[tuple, Any] = {}
        for i, ((model_name, size), group) in enumerate(groups.items()):
            try:
                loaded = self._load(model_name, size)
            except ModelInputError as err:
                raise ConfigError(str(err)) from None
            except Exception as err:  # recorded in the cells of this group
                out[(model_name, size)] = err
                continue
            if loaded.image_size is not None:  # an image model: can it take the sweep's size?
                _check_input_size(loaded, model_name, self.config.torch_dtype)
            for variant in sorted({c.variant for c in group}):
                try:
                    patch(loaded.model, variant).remove()
                except (SpecError, UnsupportedModelError) as err:
                    raise ConfigError(f"{model_name}: {err}") from None
            out[(model_name, size)] = loaded if i == 0 else None
        return out

    def _load(self, model_name: str, size: int | None) -> Any:
        return load_model(model_name, image_size=size).to(self.config.device, self.config.torch_dtype)

    def _save_config(self) -> None:
        src = self.config.source
        target = self.out / "sweep.toml"
        if src and Path(src).is_file():
            rec.write_text_atomic(target, Path(src).read_text())  # atomic: runners may share the folder
        elif src:  # the packaged default
            from importlib import resources

            rec.write_text_atomic(target, resources.files("fnabench.harness").joinpath("default_sweep.toml")
                                  .read_text())

    def _run_model(self, model_name, size, group, env, summary, progress, bar_iter, loaded=None) -> None:
        t0, started = time.perf_counter(), rec.now()
        try:
            if isinstance(loaded, Exception):
                raise loaded
            loaded = loaded or self._load(model_name, size)
        except Exception as err:  # every cell of this model fails with the load error, the sweep goes on
            if stops_the_job(err):
                raise
            for cell in group:
                next(bar_iter, None)
                if not self._take(cell, summary):
                    continue
                if cell.id in self._done:  # retime: an ok record is never replaced by a failure
                    self.log(f"retime failed, record kept: {cell.model}: {err}")
                else:
                    self._write(_failed_record(cell, started, t0, err, env), summary)
            return
        prepared: dict[tuple, Any] = {}
        for cell in group:
            next(bar_iter, None)
            if not self._take(cell, summary):
                continue
            t0, started = time.perf_counter(), rec.now()
            try:
                settings = self._settings(cell, progress)
                torch.manual_seed(settings.seed)
                key = (cell.task, settings.seed)
                if key not in prepared:
                    task = make_task(cell.task, self.config.task_options.get(cell.task))
                    prepared[key] = (task, task.prepare(loaded, settings))
                task, data = prepared[key]
                if cell.id in self._done:
                    retimed = self._retime_cell(self._done[cell.id], cell, loaded, task, data, settings, env)
                    if self._still_ours(cell.id):
                        rec.write_record(self.out, retimed)
                        summary.retimed.append(cell.id)
                    continue
                record = self._run_cell(cell, loaded, task, data, settings, started, t0, env)
            except Exception as err:
                if stops_the_job(err):
                    raise
                if cell.id in self._done:  # a failed retime keeps the record it had
                    self.log(f"retime failed, record kept: {cell.model} | {cell.variant} | {cell.task}: {err}")
                    continue
                record = _failed_record(cell, started, t0, err, env)
            self._write(record, summary)

    def _settings(self, cell: rec.Cell, progress) -> Settings:
        return Settings(image_size=cell.setting("image_size"), batch_size=self.config.batch_size,
                        device=self.config.device, dtype=self.config.torch_dtype, limit=self.config.limit,
                        seed=cell.setting("seed", 0), quiet=self.quiet, progress=progress)

    def _run_cell(self, cell, loaded, task, data, settings, started, t0, env) -> dict:
        variant = parse_variant(cell.variant)
        batch = _on_device(task.example_batch(data, settings), settings)
        timing, memory = self._time(cell, loaded, variant, batch, settings, _measured(task, loaded, data))
        with patch(loaded.model, variant) as handle:
            flops = self._count(cell, loaded, batch[:1], getattr(task, "per", "image"), _measured(task, loaded, data))
            torch.manual_seed(settings.seed)
            metrics = task.evaluate(loaded, data, settings)
            fallback = _fallback_layers(handle)
        record = _base_record(cell, started, t0, env)
        if fallback is not None:
            record["fallback"] = fallback
        if isinstance(metrics.get("details"), dict):  # what a task reports beside its metrics (per-class scores)
            metrics = dict(metrics)
            record["details"] = metrics.pop("details")
        metrics = {k: float(v) for k, v in metrics.items()}
        reason = rec.nonfinite_metrics(metrics, cell.task, cell.variant)
        if reason:  # the cell fails with the reason, the sweep goes on
            raise NonFiniteMetricError(reason)
        record.update(metrics=metrics, primary_metric=task.primary,
                      higher_is_better=dict(task.higher_is_better), flops=flops, timing=timing,
                      peak_memory_bytes=int(memory), image_size=loaded.image_size)
        record.update(_items(task, data, metrics))
        weights = weights_of(cell.model)
        if weights is not None:  # an offline model: the weights it scored, by hash (models/cards.py)
            record["weights"] = weights
        if loaded.extra.get("decoder") is not None:
            record["kv_cache"] = self._kv_cache(cell, loaded, variant, batch[:1])
        record["finished"] = rec.now()
        record["duration_s"] = round(time.perf_counter() - t0, 3)
        return record

    def _count(self, cell: rec.Cell, loaded, one: torch.Tensor, per: str = "image",
               measured: tuple[str, Callable] | None = None) -> dict:
        what, forward = measured or ("features", loaded.embed)
        key = (cell.model, cell.variant, tuple(one.shape), str(one.dtype), what)
        if key not in self._flops:
            counted = count_flops(forward, one)
            self._flops[key] = {"total": counted.total, "attention": counted.attention,
                                "gflops": counted.total / 1e9, "attention_gflops": counted.attention / 1e9,
                                "input_shape": list(one.shape), "per": per,
                                **({"forward": what} if what != "features" else {})}
        return self._flops[key]

    def _kv_cache(self, cell: rec.Cell, loaded, variant: Variant, one: torch.Tensor) -> dict:
        """What a decoder keeps after a prefill of ``one`` minus its last token, against the full cache
        exact attention keeps, and the counted FLOPs of decoding that last token on it."""
        decoder = loaded.extra["decoder"]

        def measure(spec: Variant) -> dict:
            key = (cell.model, spec.canonical, tuple(one.shape), str(one.dtype))
            if key not in self._kv:
                with patch(loaded.model, spec):
                    cache = decoder.prefill(one[:, :-1])
                    size = cache_bytes(cache)
                    step = count_flops(decoder.step, one[:, -1:], cache)
                    rate = _decode_rate(decoder, one[:, -1:], cache)
                self._kv[key] = {"bytes": size, "decode_gflops": step.total / 1e9,
                                 "decode_attention_gflops": step.attention / 1e9, "decode_tokens_per_s": rate}
            return self._kv[key]

        own, full = measure(variant), measure(parse_variant(EXACT_REFERENCE))
        return {**own, "full_bytes": full["bytes"], "prefill_tokens": int(one.shape[1]) - 1}

    def _retime_cell(self, old: dict, cell: rec.Cell, loaded, task, data, settings: Settings, env: dict) -> dict:
        """``old`` with latency and memory measured again now; metrics, FLOPs and identity unchanged.

        A record written before fnabench counted items also gets its item counts, from the same
        prepared data its metrics came from (the split is seeded, so it is the same data).
        """
        batch = _on_device(task.example_batch(data, settings), settings)
        timing, memory = self._time(cell, loaded, parse_variant(cell.variant), batch, settings,
                                    _measured(task, loaded, data))
        timing = {**timing, "retimed": {"at": rec.now(), "environment": env}}
        return {**_items(task, data, old["metrics"]), **old, "timing": timing, "peak_memory_bytes": int(memory)}

    def _time(self, cell: rec.Cell, loaded, variant: Variant, batch: torch.Tensor,
              settings: Settings, measured: tuple[str, Callable] | None = None) -> tuple[dict, int]:
        """Latency and peak memory of one batch, once per (model, variant, batch shape, forward): tasks share it.

        Timed in alternating rounds with exact attention on the same batch (unless the cell is the
        exact reference itself); the record keeps both and their ratio as ``timing.speedup``.
        """
        what, forward = measured or ("features", loaded.embed)
        key = (cell.model, cell.variant, tuple(batch.shape), str(batch.dtype), what)
        if key in self._timings:
            return self._timings[key]

        def entry(spec: Variant) -> Callable[[], contextlib.AbstractContextManager]:
            @contextlib.contextmanager
            def patched() -> Iterator[Callable[[], object]]:
                with patch(loaded.model, spec):
                    yield lambda: forward(batch)

            return patched

        reference = parse_variant(EXACT_REFERENCE)
        paired = variant.canonical != reference.canonical
        lats = measure_interleaved([entry(variant), *([entry(reference)] if paired else [])],
                                   warmup=self.config.timing_warmup, repeats=self.config.timing_repeats,
                                   device=settings.device)
        with patch(loaded.model, variant):
            memory = peak_memory(lambda: forward(batch), device=settings.device)
        n = int(batch.shape[0])
        timing = {**lats[0].as_dict(), "batch_size": n, "images_per_s": lats[0].throughput(n)}
        if paired:
            timing["reference"] = {"variant": reference.canonical, **lats[1].as_dict()}
            timing["speedup_rounds"] = [ref / own for own, ref in zip(lats[0].times, lats[1].times, strict=True)]
            timing["speedup"] = paired_speedup(timing)
        self._timings[key] = (timing, int(memory))
        return self._timings[key]

    def _write(self, record: dict, summary: SweepSummary) -> None:
        if not self._still_ours(record["id"]):
            summary.elsewhere.append(record["id"])
            return
        rec.write_record(self.out, record)
        self._release()
        (summary.ran if record["status"] == "ok" else summary.failed).append(
            record["id"] if record["status"] == "ok" else (record["id"], record["error"]))
        if record["status"] != "ok":
            self.log(f"cell failed: {record['model']} | {record['variant_short']} | {record['task']}: "
                     f"{record['error']}")


def _stamp(record: dict) -> tuple:
    """What tells one run of a cell from another: when it started and finished, and how long it took."""
    return record["started"], record["finished"], record["duration_s"]


#: decoding steps timed on a prefill's KV cache (the first two are warm-up)
DECODE_STEPS = 12


def _decode_rate(decoder, token: torch.Tensor, cache) -> float:
    """Tokens per second of single-token decoding steps on ``cache``: 1 / the median step time."""
    import statistics


    device = token.device
    times = []
    with torch.no_grad():
        for _ in range(DECODE_STEPS):
            _sync(device)
            t0 = time.perf_counter()
            decoder.step(token, cache)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return token.shape[0] / statistics.median(times[2:])


def _on_device(batch: torch.Tensor, settings: Settings) -> torch.Tensor:
    """A task's example batch on the sweep's device, in its dtype unless it holds integers (token ids)."""
    if batch.is_floating_point():
        return batch.to(settings.device, settings.dtype)
    return batch.to(settings.device)


def _fallback_layers(handle) -> dict | None:
    """With ``fallback=auto``: per tower, the blocks the last forward approximated and those it ran exactly."""
    if handle.variant.core.values.get("fallback") != "auto":
        return None
    return {tower: {"approximated": sorted(k for k, ran in state.approximated.items() if ran),
                    "exact": sorted(k for k, ran in state.approximated.items() if not ran)}
            for tower, state in handle.states.items() if state.approximated}


def _measured(task, loaded, data) -> tuple[str, Callable] | None:
    """What a cell's FLOPs, latency and memory measure when its task names it (``measures`` and
    ``forward(loaded, data)``: a classifier's logits, a whole segmentor); ``None``: the model's features."""
    what = getattr(task, "measures", None)
    return (what, task.forward(loaded, data)) if what else None


def _items(task, data, metrics) -> dict:
    """``items`` (how many items stand behind the metrics) and ``proportions`` for a record, if the task says."""
    if not hasattr(task, "items"):
        return {}
    proportions = {m: [over, float(scale)] for m, (over, scale) in getattr(task, "proportions", {}).items()
                   if m in metrics}
    return {"items": {k: int(v) for k, v in task.items(data).items()}, "proportions": proportions}


def _check_input_size(loaded, model_name: str, dtype: torch.dtype) -> None:
    """Refuse an image size the model cannot take, by a shape-only forward (fake tensors: no compute).

    Errors the fake-tensor machinery raises for itself (data-dependent shapes, unsupported ops) leave
    the question open; the cells would then find out.
    """
    from torch._subclasses import fake_tensor as ft

    inconclusive = tuple(getattr(ft, n) for n in ("DataDependentOutputException", "DynamicOutputShapeException",
                                                  "UnsupportedOperatorException", "UnsupportedFakeTensorException")
                         if hasattr(ft, n))
    size = loaded.image_size
    try:
        with ft.FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            loaded.embed(torch.zeros(1, 3, size, size, dtype=dtype, device=next(loaded.model.parameters()).device))
    except inconclusive:
        return
    except (RuntimeError, ValueError, AssertionError, IndexError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{model_name} cannot take {size}x{size} px images ({type(err).__name__}: {first[:160]}); "
                          "accepted: a size its patch embedding and position embeddings can take, "
                          "e.g. a multiple of the patch size") from None


def fail_unfinished(config: SweepConfig, cell_ids: Iterable[str], error: str) -> list[str]:
    """Record as failed, with ``error``, each of these cells that has no ``ok`` record yet: what a job that is
    about to end without them (its time limit reached for the last time) leaves, so ``status`` shows why."""
    out, wanted, env, failed = config.output_dir(), set(cell_ids), rec.environment(config.device), []
    for cell in cells(config):
        path = out / f"{cell.id}.json"
        if cell.id not in wanted or (path.is_file() and json.loads(path.read_text()).get("status") == "ok"):
            continue
        record = _base_record(cell, rec.now(), time.perf_counter(), env)
        record.update(status="failed", error=error, traceback="")
        rec.write_record(out, record)
        failed.append(cell.id)
    return failed


def run_sweep(config: SweepConfig, *, quiet: bool = False) -> SweepSummary:
    """Run ``config`` into its output folder; returns what ran, what was skipped and what failed."""
    return Runner(config, quiet=quiet).run()

