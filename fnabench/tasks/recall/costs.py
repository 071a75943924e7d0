"""Counted FLOPs of a training step (forward + backward) and of one query's forward pass.

Both go through ``fnabench.measure.count_flops`` (2 × multiply-adds). It runs its callable
under ``no_grad``; the training-step callable re-enables grad itself so the backward pass is counted
too, op by op. Attention is counted with transformers' eager implementation (the same matmuls as
SDPA) because the CPU SDPA backward op has no FLOP formula. Optimizer updates and elementwise ops
are not counted (the usual convention).
"""

from __future__ import annotations

import torch

from fnabench.measure import count_flops

from .model import RecallGPT2, masked_mse


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
