"""A run's evaluations as results for the harness's records, and back to the summaries the report tables need.

Each evaluation stored in a run directory (the plain query's curve over checkpoints, other settings, OOD
probes at the last checkpoint) gives one *result* in the shape ``fnabench.harness.suites.make_record``
completes into a harness record:

- model ``recall:PRESET@seedS`` (size and training seed), variant ``exact`` (the model's own attention),
  task ``recall:hH`` (``,probe=P`` for an OOD probe);
- settings: device ``cpu``, float32, the eval batch and seed; ``options`` the eval settings, the probe and
  the checkpoint step (so each evaluation is its own cell);
- metrics (all lower is better): ``err_kK`` (median squared error k observations after the query's open
  label, at the checkpoint), the zero and least-squares predictors' ``zero_kK`` / ``ls_kK`` on the same
  queries (k = 1, 2), and for a curve ``emergence_examples_kK`` (training examples until k emerged);
  primary ``err_k1`` (recall);
- flops: counted total and attention FLOPs of one query's forward pass; items: query examples × traces;
- started / finished: when the run directory was made and when the evaluation was written (file times),
  ``duration_s`` the training wall time up to the checkpoint;
- ``recall``: what the report's tables need besides (eval settings, emergence points, quartiles, training
  examples / FLOPs / seconds, the run config and costs, the run directory; for the plain query's curve the
  whole curve over checkpoints, ``curve``, which the figures are drawn from; ``weights_sha256``, the sha256 of
  the checkpoint file the record scored, where the run directory holds it), and whether the run is finished:
  ``steps_done`` (its last checkpoint's step when the record was made), ``steps_planned`` (its configured
  training steps) and ``finished`` (``steps_done >= steps_planned``). Every result made from a run carries
  them, whatever its own checkpoint (``step``); the report's cross-seed summaries read them.

:func:`flat_record` is the suite's earlier record shape (model, variant, task, metrics, gflops, extra), which
``recall report`` wrote as ``records.jsonl``; :func:`result_from_flat` turns one into a result, so
records of that form convert without their run directories.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from fnabench.tasks.recall import rundir
from fnabench.tasks.recall.costs import query_flops
from fnabench.tasks.recall.evaluate import eval_tag, evaluate_run
from fnabench.tasks.recall.interventions import PATCHING_DIR, stored_patching
from fnabench.tasks.recall.metrics import emergence_point
from fnabench.tasks.recall.prune import stored_circuits
from fnabench.tasks.recall.run_config import PROBES, ConfigError, RunConfig, apply_overrides, section_dict

PRIMARY = "err_k1"
#: the suite's records in the harness's ``settings``: evaluation runs in float32 on the CPU
DEVICE, DTYPE = "cpu", "float32"


def model_name(config: RunConfig) -> str:
    """The record's model string: the preset (size) and the training seed."""
    return f"recall:{config.preset}@seed{config.train.seed}"


def task_name(summary: dict) -> str:
    """``recall:h5`` for the plain query, ``recall:h5,probe=misdirected`` for a probe."""
    probe = summary.get("probe", "none")
    return summary["task"] + ("" if probe == "none" else f",probe={probe}")


def flat_record(config: RunConfig, costs: dict, summary: dict, run_dir: Path, steps_done: int | None = None) -> dict:
    """One evaluation, flat: errors at the last checkpoint, emergence points, training examples and FLOPs;
    ``steps_done`` the run's last checkpoint (None: unknown, the evaluation's own step stands in)."""
    final = summary["model"]["final"]
    metrics: dict[str, float] = {}
    for k, curve in final.items():
        metrics[f"err_k{k}"] = curve["median"][-1]
    for k in ("1", "2"):
        if k in final:
            metrics[f"err_k{k}_q25"] = final[k]["q25"][-1]
            metrics[f"err_k{k}_q75"] = final[k]["q75"][-1]
            metrics[f"zero_k{k}"] = summary["zero"]["final"][k]["median"]
            metrics[f"ls_k{k}"] = summary["ls"]["final"][k]["median"]
            point = summary["emergence"][k]
            if emergence_point(point) is not None:
                metrics[f"emergence_examples_k{k}"] = float(emergence_point(point))
                metrics[f"emergence_train_gflops_k{k}"] = emergence_point(point, "flops") / 1e9
    if len(summary["steps"]) < 2:  # a single-checkpoint (probe) evaluation has no emergence points
        metrics = {k: v for k, v in metrics.items() if not k.startswith("emergence_")}
    metrics["training_examples"] = float(summary["examples"][-1])
    metrics["training_gflops"] = summary["flops"][-1] / 1e9
    metrics["train_seconds"] = float(summary["seconds"][-1])
    metrics["parameters"] = float(costs["parameters"])
    return {
        "model": model_name(config),
        "variant": "exact",
        "task": task_name(summary),
        "metrics": metrics,
        "gflops": costs["query_forward_flops"] / 1e9,
        "extra": {
            "run_dir": str(run_dir), "preset": config.preset, "seed": config.train.seed,
            "step": summary["steps"][-1], "probe": summary.get("probe", "none"), "eval": summary["eval"],
            "steps_done": summary["steps"][-1] if steps_done is None else steps_done,
            "emergence": summary["emergence"] if len(summary["steps"]) > 1 else None,
            "curve": curve_of(summary) if len(summary["steps"]) > 1 else None,
            "config": config.to_dict(), "costs": costs,
            "gflops_means": "forward GFLOPs of one recall query (all positions); training GFLOPs are in metrics",
        },
    }


def curve_of(summary: dict) -> dict:
    """The evaluation over checkpoints that the dynamics and emergence figures draw: per checkpoint its step,
    training examples and seconds, and per k the median and quartiles of the model's error, with the zero and
    least-squares predictors' levels; what ``recall report --from-records`` draws them from."""
    final = summary["model"]["final"]
    return {"steps": list(summary["steps"]), "examples": list(summary["examples"]),
            "seconds": list(summary["seconds"]),
            "model": {k: {stat: list(final[k][stat]) for stat in ("median", "q25", "q75")} for k in final},
            **{name: {k: {"median": summary[name]["final"][k]["median"]} for k in summary[name]["final"]}
               for name in ("zero", "ls")}}


def result_from_flat(flat: dict, *, started: str, finished: str) -> dict:
    """The harness result (module docstring) of one flat record; FLOPs are counted again from its config. A flat
    record without ``steps_done`` (``records.jsonl``) counts its own checkpoint as the run's last."""
    extra, m = flat["extra"], flat["metrics"]
    config = RunConfig.from_dict(extra["config"])
    cfg = apply_overrides(config, {"eval": extra["eval"]}).eval
    total, attention = query_flops(config, cfg)
    ks = [str(k) for k in cfg.ks]
    metrics = {f"err_k{k}": m[f"err_k{k}"] for k in ks}
    for name in ("zero", "ls", "emergence_examples"):
        metrics |= {f"{name}_k{k}": m[f"{name}_k{k}"] for k in ("1", "2") if f"{name}_k{k}" in m}
    options = {k: v for k, v in extra["eval"].items() if k not in ("batch", "seed")}
    return {
        "model": flat["model"], "variant": flat["variant"], "task": flat["task"],
        "settings": {"image_size": None, "dtype": DTYPE, "device": DEVICE, "batch_size": cfg.batch, "limit": None,
                     "seed": cfg.seed, "options": {**options, "probe": extra["probe"], "step": extra["step"]}},
        "metrics": metrics, "primary_metric": PRIMARY, "higher_is_better": {name: False for name in metrics},
        "flops": {"total": total, "attention": attention},
        "items": {"query examples": cfg.examples, "traces per example": cfg.traces},
        "seed": cfg.seed, "started": started, "finished": finished, "duration_s": m["train_seconds"],
        "recall": {
            "run_dir": extra["run_dir"], "preset": extra["preset"], "train_seed": extra["seed"],
            "step": extra["step"], "probe": extra["probe"], "eval": extra["eval"], "emergence": extra["emergence"],
            **({"curve": extra["curve"]} if extra.get("curve") else {}),
            "quartiles": {f"err_k{k}": [m[f"err_k{k}_q25"], m[f"err_k{k}_q75"]] for k in ("1", "2")
                          if f"err_k{k}_q25" in m},
            "training": {"examples": int(m["training_examples"]), "gflops": m["training_gflops"],
                         "seconds": m["train_seconds"], "parameters": int(m["parameters"])},
            "config": extra["config"], "costs": extra["costs"],
            **progress(extra.get("steps_done", extra["step"]), config.train.steps),
        },
    }


def progress(steps_done: int, steps_planned: int) -> dict:
    """A record's ``recall.finished`` / ``steps_done`` / ``steps_planned``: is the run at its configured steps?"""
    return {"finished": steps_done >= steps_planned, "steps_done": steps_done, "steps_planned": steps_planned}


def last_checkpoint(run_dir: Path) -> int:
    """The step of a run's last saved checkpoint (0 when it has none)."""
    checkpoints = rundir.list_checkpoints(run_dir)
    return checkpoints[-1][0] if checkpoints else 0


def _file_time(path: Path) -> str:
    stamp = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    return stamp.isoformat(timespec="seconds")


def records_from_run(run_dir: str | Path, evaluate: bool = True) -> list[dict]:
    """Results (module docstring) for every evaluation stored in ``run_dir``: the plain query's curve first
    (evaluated now if missing and ``evaluate``), then other settings and OOD probes, which hold the last
    checkpoint's errors and no emergence points."""
    run_dir = Path(run_dir)
    config = rundir.load_config(run_dir)
    costs = rundir.read_json(run_dir / rundir.COSTS)
    main = run_dir / rundir.EVALS / eval_tag(config.eval, "none") / "summary.json"
    if not main.is_file() and evaluate:
        evaluate_run(run_dir, progress=False)
    paths = []
    for folder in sorted((run_dir / rundir.EVALS).glob("*/")):
        for name in ("summary.json", "probe.json"):  # the full curve when there is one
            if (folder / name).is_file():
                paths.append(folder / name)
                break
    paths.sort(key=lambda p: p != main)
    started = _file_time(run_dir / rundir.CONFIG)
    done = last_checkpoint(run_dir)
    results = [result_from_flat(flat_record(config, costs, rundir.read_json(p), run_dir, done), started=started,
                                finished=_file_time(p)) for p in paths]
    results += _intervention_results(run_dir, config, costs, started, done)
    checkpoints = dict(rundir.list_checkpoints(run_dir))
    for result in results:  # the model each record scored, by the sha256 of its checkpoint file
        path = checkpoints.get(result["recall"]["step"])
        if path is not None:
            result["recall"]["weights_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return results


def _base_result(config: RunConfig, costs: dict, run_dir: Path, task: str, step: int, examples_trained: int,
                 options: dict, metrics: dict, primary: str, higher: set[str], started: str, finished: str,
                 steps_done: int) -> dict:
    """A result for one intervention on a run's checkpoint (token-swap patching, a pruned circuit)."""
    total, attention = query_flops(config)
    cfg = config.eval
    return {
        "model": model_name(config), "variant": "exact", "task": task,
        "settings": {"image_size": None, "dtype": DTYPE, "device": DEVICE, "batch_size": cfg.batch, "limit": None,
                     "seed": cfg.seed, "options": {**options, "step": step}},
        "metrics": metrics, "primary_metric": primary,
        "higher_is_better": {name: name in higher for name in metrics},
        "flops": {"total": total, "attention": attention}, "seed": cfg.seed, "started": started,
        "finished": finished, "duration_s": 0.0,
        "recall": {"run_dir": str(run_dir), "preset": config.preset, "train_seed": config.train.seed, "step": step,
                   "probe": task.split(",", 1)[1], "eval": json.loads(json.dumps(section_dict(cfg))),
                   "emergence": None, "training": {"examples": examples_trained},
                   "config": config.to_dict(), "costs": costs, **progress(steps_done, config.train.steps)},
    }


def _intervention_results(run_dir: Path, config: RunConfig, costs: dict, started: str, done: int) -> list[dict]:
    """Results for the token-swap patching and the pruned circuits stored in a run directory."""

    out = []
    folder = run_dir / rundir.EVALS / PATCHING_DIR
    for stored in stored_patching(run_dir):
        if stored["eval"] != section_dict(config.eval):
            continue
        finished = _file_time(folder / f"step_{stored['step']:08d}.json")
        for swap, rows in stored["rows"].items():
            ref = {r["layer"]: r for r in rows}
            k = "k1" if swap == "label" else "k2"
            metrics = {f"{key}_{layer}": ref[layer][key] for layer in ("clean", "swapped", "donor")
                       for key in ("k1_needle", "k2_needle")}
            result = _base_result(config, costs, run_dir, f"{config.eval.name},patch={swap}", stored["step"],
                                  stored["examples_trained"],
                                  {"patch": swap, "examples": stored["examples"], "traces": stored["traces"]},
                                  metrics, f"{k}_needle_swapped", set(), started, finished, done)
            result["items"] = {"query examples": stored["examples"], "traces per example": stored["traces"]}
            result["recall"]["patching"] = {"swap": swap, "rows": rows}
            out.append(result)
    for path, circuit in stored_circuits(run_dir):
        target = circuit["target"]
        other = "k2" if target == "k1" else "k1"
        own = circuit["scores"][target][circuit["corruption"]]
        cross = circuit["scores"][other]["observation" if other == "k2" else "label"]
        metrics = {"edges_kept": float(circuit["edges_kept"]), "sparsity": circuit["sparsity"],
                   "recovered": own["recovered"], "err": own["err"], "mse_to_model": own["mse_to_model"],
                   "model_err": own["model_err"], "ablated_err": own["ablated_err"],
                   "cross_recovered": cross["recovered"], "cross_err": cross["err"]}
        metrics = {k: v for k, v in metrics.items() if v is not None}  # None: the swap did no damage to recover
        sparsity = circuit["settings"]["sparsity"]
        result = _base_result(config, costs, run_dir, f"{config.eval.name},circuit={target},sparsity={sparsity:g}",
                              circuit["step"], circuit["examples"],
                              {"circuit": target, "prune": circuit["settings"]}, metrics, "mse_to_model",
                              {"recovered", "cross_recovered"}, started, _file_time(path), done)
        result["items"] = {"query examples": circuit["settings"]["test_examples"],
                           "traces per example": circuit["settings"]["test_traces"]}
        result["duration_s"] = circuit["seconds"]
        result["recall"]["circuit"] = {k: v for k, v in circuit.items() if k != "history"}
        out.append(result)
    return out


# ---------------------------------------------------------------------------------------------- records → tables


def run_progress(record: dict) -> dict:
    """``finished`` / ``steps_done`` / ``steps_planned`` of the run a record was made from: as the record holds
    them, else (records made before they were kept) its checkpoint against its config's training steps."""
    r = record["recall"]
    if "finished" in r:
        return {key: r[key] for key in ("finished", "steps_done", "steps_planned")}
    return progress(r["step"], RunConfig.from_dict(r["config"]).train.steps)


def summary_from_record(record: dict) -> dict:
    """The part of an evaluation summary the report's tables read, rebuilt from one harness record; with the
    whole curve over checkpoints where the record holds it (``recall.curve``), so the figures can be drawn."""
    r, m = record["recall"], record["metrics"]
    curve = r.get("curve")
    if curve:
        return {"task": record["task"].split(",probe=")[0], "probe": r["probe"], "eval": r["eval"],
                "steps": curve["steps"], "examples": curve["examples"], "seconds": curve["seconds"],
                "model": {"final": curve["model"]}, "zero": {"final": curve["zero"]}, "ls": {"final": curve["ls"]},
                "emergence": r["emergence"]}
    ks = [str(k) for k in r["eval"]["ks"]]
    final = {k: {"median": [m[f"err_k{k}"]]} for k in ks}
    for name, (q25, q75) in r["quartiles"].items():
        final[name.removeprefix("err_k")] |= {"q25": [q25], "q75": [q75]}
    baselines = {name: {"final": {k: {"median": m[f"{name}_k{k}"]} for k in ks if f"{name}_k{k}" in m}}
                 for name in ("zero", "ls")}
    return {"task": record["task"].split(",probe=")[0], "probe": r["probe"], "eval": r["eval"], "steps": [r["step"]],
            "examples": [r["training"]["examples"]], "seconds": [r["training"]["seconds"]],
            "model": {"final": final}, **baselines, "emergence": r["emergence"]}


def runs_from_records(records: list[dict]) -> list[dict]:
    """Per run (model), in (preset, training seed) order: its label, config, costs, the summary of its plain
    query's curve (its latest) and ``probes``, {probe: summary} at that checkpoint under the run's eval settings
    (``{"skipped": ...}`` for a probe with no record), and ``finished`` / ``steps_done`` / ``steps_planned`` as
    that curve's record holds them (a record made before they were recorded: its step against the config's
    steps). Records that are not the recall suite's are refused."""
    by_model: dict[str, list[dict]] = {}
    for record in records:
        if not isinstance(record.get("recall"), dict):
            raise ConfigError(f"record {record.get('id')} ({record.get('model')} / {record.get('task')}) is not a "
                              "recall record; accepted: records that `fnabench recall report` wrote")
        by_model.setdefault(record["model"], []).append(record)
    runs = []
    for model, group in by_model.items():
        config = RunConfig.from_dict(group[0]["recall"]["config"])
        default = json.loads(json.dumps(config.to_dict()["eval"]))
        own = [g for g in group if g["recall"]["eval"] == default]
        curves = [g for g in own if g["recall"]["probe"] == "none" and g["recall"]["emergence"] is not None]
        if not curves:
            raise ConfigError(f"{model}: no record of the plain recall query's curve; accepted: records that "
                              "`fnabench recall report RUN_DIR...` wrote (it evaluates every checkpoint)")
        main = max(curves, key=lambda g: g["recall"]["step"])
        step = main["recall"]["step"]
        at_step = {g["recall"]["probe"]: g for g in own if g["recall"]["step"] == step and g is not main}
        probes = {}
        for probe in PROBES:
            record = main if probe == "none" else at_step.get(probe)
            probes[probe] = summary_from_record(record) if record else {"skipped": "no record"}
        run = {"label": f"{config.preset} seed {config.train.seed}", "config": config,
               "costs": main["recall"]["costs"], "summary": summary_from_record(main), "probes": probes,
               **run_progress(main)}
        patching = {g["recall"]["patching"]["swap"]: g["recall"]["patching"]["rows"] for g in own
                    if g["recall"].get("patching") and g["recall"]["step"] == step}
        if patching:
            run["patching"] = {swap: patching[swap] for swap in sorted(patching)}
        circuits: dict[float, dict[str, dict]] = {}
        for g in sorted((g for g in own if g["recall"].get("circuit") and g["recall"]["step"] == step),
                        key=lambda g: g["recall"]["circuit"]["target"]):
            circuit = g["recall"]["circuit"]
            circuits.setdefault(circuit["settings"]["sparsity"], {})[circuit["target"]] = circuit
        if circuits:
            run["circuits"] = dict(sorted(circuits.items()))
        runs.append(run)
    return sorted(runs, key=lambda run: (run["config"].preset, run["config"].train.seed))
