"""Named run configurations: the paper's four GPT-2 sizes and the scaled-down CPU presets."""

from __future__ import annotations

import math
from dataclasses import replace

from fnabench.tasks.recall.run_config import ConfigError, DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig

#: the paper's learning rate at batch 512 for the medium model
BASE_LR = 1.5849e-5


def paper_lr(batch: int, multiplier: float) -> float:
    """The authors' rule: lr = sqrt(batch / 512) · multiplier · 1.5849e-5."""
    return math.sqrt(batch / 512) * multiplier * BASE_LR


def _paper(name: str, n_embd: int, n_layer: int, n_head: int, batch: int, multiplier: float) -> RunConfig:
    return RunConfig(
        preset=name,
        data=DataConfig(),
        model=ModelConfig(n_embd=n_embd, n_layer=n_layer, n_head=n_head),
        train=TrainConfig(batch=batch, lr=paper_lr(batch, multiplier), steps=200_000, checkpoint_every=1000),
        eval=EvalConfig(haystack=5),
    )


def _cpu() -> RunConfig:
    """The CPU reproduction (leaderboards/recall-cpu/README.md): 1-dim orthogonal systems (a sign each, so
    continuing needs the system's sign from context), 8 labels, context 64, a 3-layer 64-wide GPT-2."""
    return RunConfig(
        preset="cpu",
        data=DataConfig(state_dim=1, num_labels=8, context=64, train_systems=20_000, val_systems=100),
        model=ModelConfig(n_embd=64, n_layer=3, n_head=4),
        train=TrainConfig(batch=32, lr=1e-3, steps=16_000, checkpoint_every=200, log_every=50),
        eval=EvalConfig(haystack=3, segment_obs=6, examples=48, traces=64, ks=(1, 2, 3, 6), batch=1024),
    )


def _cpu_ident() -> RunConfig:
    """The CPU preset with identity dynamics (the authors' ``ident`` family): 3-dim states that never change,
    so continuing is copying and recall is pure label lookup; recall emerges within a few thousand steps."""
    base = _cpu()
    return replace(base, preset="cpu-ident", data=replace(base.data, state_dim=3, family="ident"),
                   train=replace(base.train, steps=6_000))


def _cpu_n5() -> RunConfig:
    """The CPU preset at the paper's state dimension (leaderboards/recall-cpu-n5/README.md): Haar O(5) systems,
    10 labels, context 72 (one H = 5 recall query with 10 observations per segment), a 4-layer 64-wide GPT-2."""
    return RunConfig(
        preset="cpu-n5",
        data=DataConfig(state_dim=5, num_labels=10, context=72, train_systems=40_000, val_systems=100),
        model=ModelConfig(n_embd=64, n_layer=4, n_head=4),
        train=TrainConfig(batch=64, lr=1e-3, steps=20_000, checkpoint_every=250, log_every=50),
        eval=EvalConfig(haystack=5, segment_obs=10, examples=48, traces=64, ks=(1, 2, 3, 8), batch=1024,
                        emergence_rule="sustained"),
    )


def _smoke() -> RunConfig:
    """Seconds-long run for checking that the pipeline works end to end (not for results)."""
    return RunConfig(
        preset="smoke",
        data=DataConfig(state_dim=3, num_labels=6, context=40, train_systems=500, val_systems=20),
        model=ModelConfig(n_embd=32, n_layer=2, n_head=2),
        train=TrainConfig(batch=8, lr=1e-3, steps=40, checkpoint_every=20, log_every=10),
        eval=EvalConfig(haystack=2, segment_obs=4, examples=4, traces=8, ks=(1, 2, 3), batch=64),
    )


PRESETS: dict[str, RunConfig] = {
    "tiny": _paper("tiny", 72, 3, 6, 2048, 4.0),
    "small": _paper("small", 96, 6, 6, 1024, 2.0),
    "medium": _paper("medium", 128, 12, 8, 512, 1.0),
    "big": _paper("big", 192, 24, 12, 640, 0.833),
    "cpu": _cpu(),
    "cpu-ident": _cpu_ident(),
    "cpu-n5": _cpu_n5(),
    "smoke": _smoke(),
}


def get_preset(name: str) -> RunConfig:
    """The preset called ``name``; an unknown name is a ConfigError listing the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}") from None
