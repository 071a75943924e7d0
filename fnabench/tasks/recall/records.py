"""Harness records from a run: one dict per evaluated (run, task) with model / variant / task / metrics / gflops."""

from __future__ import annotations

from pathlib import Path

from . import rundir
from .config import RunConfig
from .evaluate import eval_tag, evaluate_run


def model_name(config: RunConfig) -> str:
    """The record's model string: the preset (size) and the training seed."""
    return f"gpt2-recall:{config.preset}@seed{config.train.seed}"


def task_name(summary: dict) -> str:
    """``recall:h5`` for the plain query, ``recall:h5,probe=misdirected`` for a probe."""
    probe = summary.get("probe", "none")
    return summary["task"] + ("" if probe == "none" else f",probe={probe}")


def record_from_summary(config: RunConfig, costs: dict, summary: dict, run_dir: Path) -> dict:
    """One record: errors at the last checkpoint, emergence points, training examples and FLOPs."""
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
            if point["examples"] is not None:
                metrics[f"emergence_examples_k{k}"] = float(point["examples"])
                metrics[f"emergence_train_gflops_k{k}"] = point["flops"] / 1e9
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
            "emergence": summary["emergence"] if len(summary["steps"]) > 1 else None,
            "config": config.to_dict(), "costs": costs,
            "gflops_means": "forward GFLOPs of one recall query (all positions); training GFLOPs are in metrics",
        },
    }


def records_from_run(run_dir: str | Path, evaluate: bool = True) -> list[dict]:
    """Records for every evaluation stored in ``run_dir`` (the plain query's curve first, evaluated now if missing
    and ``evaluate``; then other settings and OOD probes), in the harness's record shape: model, variant, task,
    metrics, gflops, extra. Probe records hold the last checkpoint's errors and no emergence points."""
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
    return [record_from_summary(config, costs, rundir.read_json(p), run_dir) for p in paths]
