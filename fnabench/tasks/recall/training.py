"""Training: seeded, resumable, checkpointed AdamW on masked next-state MSE over fresh interleaved traces.

The batch of step s is drawn from ``default_rng([seed, s])``, so a run resumed from any checkpoint
sees exactly the batches an unbroken run would and ends with the same weights (same thread count).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fnabench.tasks.recall import rundir
from fnabench.tasks.recall.costs import forward_flops, train_step_flops
from fnabench.tasks.recall.network import RecallGPT2, build_model, masked_mse
from fnabench.tasks.recall.run_config import ConfigError, RunConfig
from fnabench.tasks.recall.systems import make_corpus
from fnabench.tasks.recall.tokens import TokenLayout
from fnabench.tasks.recall.traces import sample_batch


@dataclass
class TrainResult:
    """What a call to :func:`train` did: steps reached, counters, and throughput of the steps it ran."""

    step: int
    examples: int
    flops: int
    loss: float
    seconds: float  # training wall time of the whole run so far (all sessions)
    steps_run: int  # steps run by this call
    tokens_per_s: float  # this call's throughput (input tokens per second)
    stopped: bool  # True when it stopped before the configured number of steps


def set_threads(threads: int | None) -> None:
    """Use ``threads`` intra-op CPU threads (None: leave torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def batch_tensors(config: RunConfig, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (inputs, targets, mask) of training step ``step``, reproducible from the seed and the step alone."""
    data = config.data
    rng = np.random.default_rng([config.train.seed, step])
    batch = sample_batch(make_corpus(data), data, TokenLayout(data.state_dim, data.num_labels), config.train.batch,
                         rng)
    return (torch.from_numpy(batch["inputs"]), torch.from_numpy(batch["targets"]),
            torch.from_numpy(np.ascontiguousarray(batch["mask"])))


def _prepare(run_dir: Path, config: RunConfig | None) -> RunConfig:
    if rundir.is_run(run_dir):
        stored = rundir.load_config(run_dir)
        if config is None or config.to_dict() == stored.to_dict():
            return stored
        if _training_identity(config) != _training_identity(stored):
            raise ConfigError(f"{run_dir} holds a run with a different config; resume it without overrides "
                              "(or with only a new train.steps or new eval settings) or train into a new directory")
        rundir.save_config(run_dir, config.validate(), {"fnabench_task": "recall"})  # extended, shortened, re-evaluated
        return config
    if config is None:
        raise ConfigError(f"{run_dir} is not a run directory and no config was given")
    config.validate()
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.save_config(run_dir, config, {"fnabench_task": "recall"})
    return config


def _training_identity(config: RunConfig) -> dict:
    """What fixes a run's weights at every step: everything but its length and its evaluation settings."""
    raw = config.to_dict()
    raw["train"].pop("steps")
    raw.pop("eval")
    return raw


def _costs(run_dir: Path, model: RecallGPT2, config: RunConfig) -> dict:
    path = run_dir / rundir.COSTS
    if path.is_file():
        return rundir.read_json(path)
    inputs, targets, mask = batch_tensors(config, 0)
    costs = {
        "train_step_flops": train_step_flops(model, inputs, targets, mask),
        "query_forward_flops": forward_flops(model, config.eval.seq_len - 1),
        "parameters": model.num_parameters(),
        "tokens_per_step": config.train.batch * (config.data.context - 1),
        "examples_per_step": config.train.batch,
    }
    rundir.write_json(path, costs)
    return costs


def _progress(total: int, initial: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ModuleNotFoundError:  # progress bar is optional
        return None
    return tqdm(total=total, initial=initial, disable=not enabled, desc="recall train", unit="step",
                dynamic_ncols=True)


def _checkpoint(run_dir: Path, model, optimizer, step: int, counters: dict, with_step_file: bool) -> None:
    state = {"step": step, "model": model.state_dict(), **counters}
    if with_step_file:
        rundir.atomic_save(state, rundir.step_path(run_dir, step))
    rundir.atomic_save({**state, "optimizer": optimizer.state_dict()}, run_dir / rundir.RESUME)


def train(run_dir: str | Path, config: RunConfig | None = None, *, until_step: int | None = None,
          threads: int | None = None, progress: bool = True,
          on_checkpoint: Callable[[int], None] | None = None) -> TrainResult:
    """Train (or resume) the run in ``run_dir`` up to ``config.train.steps`` (or ``until_step``, a planned stop)."""
    run_dir = Path(run_dir)
    config = _prepare(run_dir, config)
    set_threads(threads)
    t = config.train
    torch.manual_seed(t.seed)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    costs = _costs(run_dir, model, config)
    counters = {"examples": 0, "flops": 0, "seconds": 0.0}
    start = 0
    if (run_dir / rundir.RESUME).is_file():
        state = torch.load(run_dir / rundir.RESUME, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        counters = {k: state[k] for k in counters}
        rundir.truncate_log(run_dir, start)
    else:
        _checkpoint(run_dir, model, optimizer, 0, counters, with_step_file=True)
    end = t.steps if until_step is None else min(until_step, t.steps)

    bar = _progress(t.steps, start, progress)
    window: list[float] = []
    loss_value = float("nan")
    seconds_before = counters["seconds"]
    last = time.perf_counter()
    completed = start
    try:
        for step in range(start, end):
            inputs, targets, mask = batch_tensors(config, step)
            if t.warmup:
                for group in optimizer.param_groups:
                    group["lr"] = t.lr_at(step)
            loss = masked_mse(model(inputs), targets, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            completed = done = step + 1
            loss_value = loss.item()
            window.append(loss_value)
            now = time.perf_counter()
            counters["seconds"] += now - last
            last = now
            counters["examples"] += t.batch
            counters["flops"] += costs["train_step_flops"]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            if done % t.log_every == 0 or done == t.steps:
                rundir.append_log(run_dir, {"step": done, "loss": float(np.mean(window)), **counters})
                window = []
            if done % t.checkpoint_every == 0 or done == t.steps:
                _checkpoint(run_dir, model, optimizer, done, counters, with_step_file=True)
                if on_checkpoint is not None:
                    on_checkpoint(done)
                last = time.perf_counter()  # evaluation and saving are not training time
    except KeyboardInterrupt:
        _checkpoint(run_dir, model, optimizer, completed, counters, with_step_file=False)
        raise
    finally:
        if bar is not None:
            bar.close()
    if completed % t.checkpoint_every != 0 and completed != t.steps and completed > start:
        _checkpoint(run_dir, model, optimizer, completed, counters, with_step_file=False)  # planned stop: resumable
    elapsed = counters["seconds"] - seconds_before
    steps_run = completed - start
    return TrainResult(completed, counters["examples"], counters["flops"], loss_value, counters["seconds"], steps_run,
                       steps_run * costs["tokens_per_step"] / elapsed if steps_run else 0.0, completed < t.steps)


def measure_throughput(config: RunConfig, batch: int | None = None, steps: int = 5, warmup: int = 2) -> dict:
    """Training throughput of a config's model and data on this machine: median step time over ``steps`` timed
    optimizer steps (after ``warmup``), data sampling included, at micro-batch ``batch`` (default the config's)."""
    from dataclasses import replace

    config = replace(config, train=replace(config.train, batch=batch or config.train.batch)).validate()
    torch.manual_seed(config.train.seed)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
    times, data_times = [], []
    for step in range(warmup + steps):
        began = time.perf_counter()
        inputs, targets, mask = batch_tensors(config, step)
        sampled = time.perf_counter()
        loss = masked_mse(model(inputs), targets, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip)
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - began)
            data_times.append(sampled - began)
    step_s = float(np.median(times))
    tokens = config.train.batch * (config.data.context - 1)
    return {"preset": config.preset, "batch": config.train.batch, "tokens_per_step": tokens,
            "step_seconds": step_s, "data_seconds": float(np.median(data_times)), "tokens_per_s": tokens / step_s,
            "examples_per_s": config.train.batch / step_s, "parameters": model.num_parameters(),
            "threads": torch.get_num_threads()}
