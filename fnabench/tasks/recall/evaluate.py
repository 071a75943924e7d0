"""Evaluation of a run's checkpoints on recall queries: error at k after the final (and initial) open label,
medians over traces and quartiles over examples, the zero and least-squares baselines, and emergence."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fnabench.data.cache import content_hash
from fnabench.tasks.recall import rundir
from fnabench.tasks.recall.baselines import least_squares_errors, zero_errors
from fnabench.tasks.recall.metrics import (
    first_below,
    k_after,
    median_over_traces,
    position_errors,
    quartiles,
    stays_below,
)
from fnabench.tasks.recall.network import RecallGPT2, build_model
from fnabench.tasks.recall.queries import QueryExample, iter_examples
from fnabench.tasks.recall.run_config import PROBES, ConfigError, EvalConfig, RunConfig, section_dict
from fnabench.tasks.recall.systems import make_corpus
from fnabench.tasks.recall.tokens import TokenLayout

SERIES = ("final", "initial")


def eval_tag(cfg: EvalConfig, probe: str) -> str:
    """Cache folder name of one evaluation setting: readable prefix plus a hash of every setting."""
    settings = section_dict(cfg)
    settings.pop("emergence_rule", None)  # how a curve is read, not what is measured: the cache is shared
    digest = content_hash([settings, probe], 8)
    return f"{probe}-h{cfg.haystack}-needle{cfg.needle}-{digest}"


def _ks(cfg: EvalConfig) -> dict[str, list[int]]:
    return {"final": list(cfg.ks), "initial": [k for k in cfg.ks if k <= cfg.segment_obs]}


def predict(model: RecallGPT2, tokens: np.ndarray, batch: int) -> np.ndarray:
    """Model outputs [R, L-1, n] for inputs tokens[:, :-1], in chunks of ``batch`` traces."""
    out = []
    with torch.inference_mode():
        for i in range(0, tokens.shape[0], batch):
            chunk = torch.from_numpy(np.ascontiguousarray(tokens[i:i + batch, :-1]))
            out.append(model(chunk).numpy())
    return np.concatenate(out)


def _example_model_medians(model, example: QueryExample, cfg: EvalConfig, layout: TokenLayout) -> dict:
    errors = position_errors(predict(model, example.tokens, cfg.batch), example.tokens, layout)
    ks = _ks(cfg)
    return {
        "final": {k: median_over_traces(v) for k, v in k_after(errors, example.final_open, ks["final"]).items()},
        "initial": {k: median_over_traces(v) for k, v in k_after(errors, example.needle_open, ks["initial"]).items()},
    }


def _example_baseline_medians(example: QueryExample, cfg: EvalConfig) -> dict:
    ks = _ks(cfg)
    history, offset = example.history, example.history_offset
    needle = example.needle_states
    zero_h, ls_h = zero_errors(history), least_squares_errors(history)
    zero_n, ls_n = zero_errors(needle), least_squares_errors(needle)
    out = {}
    for name, (h_err, n_err) in {"zero": (zero_h, zero_n), "ls": (ls_h, ls_n)}.items():
        out[name] = {
            "final": {k: median_over_traces(h_err[:, offset + k - 1]) for k in ks["final"]},
            "initial": {k: median_over_traces(n_err[:, k - 1]) for k in ks["initial"]},
        }
    return out


def _collect(per_example: list[dict]) -> dict:
    """[{series: {k: median}}] over examples → {series: {k: quartiles}} (k as a string, JSON style)."""
    return {s: {str(k): quartiles([ex[s][k] for ex in per_example]) for k in per_example[0][s]} for s in SERIES}


def load_checkpoint(config: RunConfig, path: Path) -> tuple[RecallGPT2, dict]:
    """A run's model with the weights of one checkpoint file, and that file's counters."""
    state = torch.load(path, weights_only=False)
    model = build_model(config)
    model.load_state_dict(state["model"])
    return model.eval(), {k: state[k] for k in ("step", "examples", "flops", "seconds")}


def evaluate_model(model: RecallGPT2, config: RunConfig, cfg: EvalConfig, probe: str = "none",
                   with_baselines: bool = False) -> dict:
    """Quartiles over examples of the median error at each k (model, and optionally the baselines)."""
    layout = TokenLayout(config.data.state_dim, config.data.num_labels)
    systems = make_corpus(config.data).val
    model_rows, base_rows = [], []
    for example in iter_examples(systems, config.data, cfg, probe):
        model_rows.append(_example_model_medians(model, example, cfg, layout))
        if with_baselines:
            base_rows.append(_example_baseline_medians(example, cfg))
    out = {"model": _collect(model_rows)}
    if with_baselines:
        out["zero"] = _collect([r["zero"] for r in base_rows])
        out["ls"] = _collect([r["ls"] for r in base_rows])
    return out


def evaluate_baselines(config: RunConfig, cfg: EvalConfig, probe: str = "none") -> dict:
    """Zero and least-squares quartiles on the same queries (no model needed)."""
    systems = make_corpus(config.data).val
    rows = [_example_baseline_medians(ex, cfg) for ex in iter_examples(systems, config.data, cfg, probe)]
    return {"zero": _collect([r["zero"] for r in rows]), "ls": _collect([r["ls"] for r in rows])}


def resolve_eval(config: RunConfig, **overrides) -> EvalConfig:
    """The run's eval settings with the non-None ``overrides`` applied, validated against the run."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    cfg = replace(config.eval, **changes)
    replace(config, eval=cfg).validate()
    if cfg.seq_len - 1 > config.n_positions:
        raise ConfigError(f"a query of {cfg.seq_len} tokens is longer than the model's {config.n_positions} "
                          "positions; use a smaller --haystack")
    return cfg


def evaluate_run(run_dir: str | Path, cfg: EvalConfig | None = None, probe: str = "none", *,
                 steps: list[int] | None = None, progress: bool = True, refresh: bool = False) -> dict:
    """Evaluate every checkpoint of a run (cached per checkpoint) and write/return the curve summary. A checkpoint
    whose weights were deleted after its evaluation was cached keeps its place in the whole curve, so a run
    carried elsewhere needs only its evaluations, its last checkpoint and ``resume.pt``."""
    run_dir = Path(run_dir)
    config = rundir.load_config(run_dir)
    cfg = cfg or config.eval
    tag = eval_tag(cfg, probe)
    checkpoints = [(s, p) for s, p in rundir.list_checkpoints(run_dir) if steps is None or s in steps]
    if steps is None:  # the whole curve: cached evaluations of checkpoints no longer on disk count too
        held = {s for s, _ in checkpoints}
        cached = [(int(p.stem.removeprefix("step_")), None) for p in (run_dir / rundir.EVALS / tag).glob("step_*.json")]
        checkpoints = sorted(checkpoints + [(s, None) for s, _ in cached if s not in held], key=lambda t: t[0])
    if not checkpoints:
        raise ConfigError(f"{run_dir} has no checkpoints to evaluate")
    base_path = run_dir / rundir.EVALS / tag / "baselines.json"
    if base_path.is_file() and not refresh:
        baselines = rundir.read_json(base_path)
    else:
        baselines = evaluate_baselines(config, cfg, probe)
        rundir.write_json(base_path, baselines)
    rows = []
    bar = _bar(len(checkpoints), progress)
    for step, path in checkpoints:
        out = rundir.eval_path(run_dir, tag, step)
        if out.is_file() and (not refresh or path is None):
            row = rundir.read_json(out)
        else:
            model, counters = load_checkpoint(config, path)
            row = {**counters, **evaluate_model(model, config, cfg, probe)}
            rundir.write_json(out, row)
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    summary = summarize(rows, baselines, cfg, probe)
    if steps is None:  # the whole curve; a subset (live or probe evaluation) is not the run's summary
        rundir.write_json(run_dir / rundir.EVALS / tag / "summary.json", summary)
    return summary


def summarize(rows: list[dict], baselines: dict, cfg: EvalConfig, probe: str) -> dict:
    """Curves over checkpoints and the emergence point of every k after the final open label."""
    rows = sorted(rows, key=lambda r: r["step"])
    curves = {s: {k: {q: [r["model"][s][k][q] for r in rows] for q in ("q25", "median", "q75")}
                  for k in rows[0]["model"][s]} for s in SERIES}
    summary = {
        "task": cfg.name, "probe": probe, "eval": section_dict(cfg),
        "steps": [r["step"] for r in rows], "examples": [r["examples"] for r in rows],
        "flops": [r["flops"] for r in rows], "seconds": [r.get("seconds", 0.0) for r in rows],
        "model": curves, **baselines,
    }
    summary["emergence"] = {k: emergence(summary, k, cfg.emergence_fraction, cfg.emergence_rule)
                            for k in curves["final"]}
    return summary


def emergence(summary: dict, k: str, fraction: float, rule: str = "first") -> dict:
    """When the median error at k after the final label first falls (and stays) below fraction × zero's.

    ``step``/``examples``/``flops`` are the first crossing, ``stable_*`` the checkpoint from which the curve stays
    below to the end of the run; ``rule`` (stored when not ``first``) says which one is the emergence point."""
    threshold = fraction * summary["zero"]["final"][k]["median"]
    medians = summary["model"]["final"][k]["median"]
    out: dict = {"threshold": threshold}
    for key, index in (("", first_below(medians, threshold)), ("stable_", stays_below(medians, threshold))):
        for field, series in (("step", "steps"), ("examples", "examples"), ("flops", "flops")):
            out[key + field] = None if index is None else summary[series][index]
    if rule != "first":
        out["rule"] = rule
    return out


def _bar(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ModuleNotFoundError:
        return None
    return tqdm(total=total, disable=not enabled, desc="recall eval", unit="ckpt", dynamic_ncols=True)


def evaluate_probes(run_dir: str | Path, cfg: EvalConfig | None = None, probes: tuple[str, ...] | None = None,
                    step: int | None = None, progress: bool = True) -> dict[str, dict]:
    """Each OOD probe (and the plain query) at one checkpoint (default: the last): {probe: summary}."""
    step, _ = rundir.pick_checkpoint(run_dir, step, "evaluate")
    config = rundir.load_config(run_dir)
    cfg = cfg or config.eval
    out = {}
    for probe in probes or PROBES:
        try:
            out[probe] = evaluate_run(run_dir, cfg, probe, steps=[step], progress=progress)
        except ConfigError as exc:  # e.g. sync on a noisy family: recorded, not fatal
            out[probe] = {"skipped": str(exc)}
            continue
        rundir.write_json(Path(run_dir) / rundir.EVALS / eval_tag(cfg, probe) / "probe.json", out[probe])
    return out
