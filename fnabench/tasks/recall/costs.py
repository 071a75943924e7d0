"""Counted FLOPs of a training step (forward + backward) and of one query's forward pass.

Both go through ``fnabench.measure.count_flops`` (2 × multiply-adds). It runs its callable
under ``no_grad``; the training-step callable re-enables grad itself so the backward pass is counted
too, op by op. The training step counts attention with transformers' eager implementation (the same
matmuls as SDPA) because the CPU SDPA backward op has no FLOP formula; a query's forward pass
(:func:`query_flops`) runs SDPA, so its attention FLOPs are counted apart. Optimizer updates and
elementwise ops are not counted (the usual convention).
"""

from __future__ import annotations

import json

import torch

from fnabench.measure import count_flops
from fnabench.tasks.recall.network import RecallGPT2, build_model, masked_mse
from fnabench.tasks.recall.run_config import EvalConfig, RunConfig, section_dict


def train_step_flops(model: RecallGPT2, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> int:
    """FLOPs of one forward + backward pass of the masked loss on this batch; leaves no gradients behind."""

    def step() -> None:
        with torch.enable_grad():
            masked_mse(model(inputs), targets, mask).backward()

    saved = [p.grad for p in model.parameters()]
    try:
        with model.attention_implementation("eager"):
            return count_flops(step).total
    finally:
        for p, grad in zip(model.parameters(), saved, strict=True):
            p.grad = grad


def forward_flops(model: RecallGPT2, seq_len: int) -> int:
    """FLOPs of predicting every position of one sequence of ``seq_len`` input tokens."""
    tokens = torch.zeros(1, seq_len, model.read_in.in_features)
    with model.attention_implementation("eager"):
        return count_flops(model, tokens).total


_QUERY_FLOPS: dict[str, tuple[int, int]] = {}


def query_flops(config: RunConfig, cfg: EvalConfig | None = None) -> tuple[int, int]:
    """Counted (total, attention) FLOPs of one recall query's forward pass under ``cfg`` (default: the run's).

    Counted on a freshly built model (FLOPs do not depend on the weights; the torch RNG is left as it was)
    with SDPA attention, whose FLOPs the counter attributes to attention; the total equals the eager count.
    """
    cfg = cfg or config.eval
    key = json.dumps([config.to_dict(), section_dict(cfg)], sort_keys=True)
    if key not in _QUERY_FLOPS:
        with torch.random.fork_rng(devices=[]):
            model = build_model(config).eval()
        tokens = torch.zeros(1, cfg.seq_len - 1, model.read_in.in_features)
        with model.attention_implementation("sdpa"):
            counted = count_flops(model, tokens)
        _QUERY_FLOPS[key] = (counted.total, counted.attention)
    return _QUERY_FLOPS[key]
