"""The regression transformer: linear read-in → transformers' GPT2Model on ``inputs_embeds`` → linear read-out."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from fnabench.tasks.recall.run_config import ConfigError, RunConfig
from fnabench.tasks.recall.tokens import TokenLayout


def _gpt2():
    try:
        from transformers import GPT2Config, GPT2Model
    except ModuleNotFoundError:
        raise ConfigError("the recall model needs transformers: pip install 'fnabench[recall]'") from None
    return GPT2Config, GPT2Model


class RecallGPT2(nn.Module):
    """Predicts the next state at every position from continuous tokens [B, T, dim] → [B, T, n]."""

    def __init__(self, token_dim: int, state_dim: int, n_embd: int, n_layer: int, n_head: int, n_positions: int,
                 attention: str = "sdpa") -> None:
        super().__init__()
        config_cls, model_cls = _gpt2()
        config = config_cls(vocab_size=1, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                            bos_token_id=None, eos_token_id=None)
        config._attn_implementation = attention
        self.read_in = nn.Linear(token_dim, n_embd)
        self.backbone = model_cls(config)
        self.read_out = nn.Linear(n_embd, state_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(inputs_embeds=self.read_in(tokens)).last_hidden_state
        return self.read_out(hidden)

    def num_parameters(self) -> int:
        """Trained parameters (GPT-2's unused token embedding ``wte`` excluded)."""
        unused = self.backbone.wte.weight.numel()
        return sum(p.numel() for p in self.parameters()) - unused

    @contextlib.contextmanager
    def attention_implementation(self, name: str):
        """Temporarily switch transformers' attention implementation (same math; used for FLOP counting)."""
        config = self.backbone.config
        previous = config._attn_implementation
        config._attn_implementation = name
        try:
            yield self
        finally:
            config._attn_implementation = previous


def build_model(config: RunConfig) -> RecallGPT2:
    """The model a run config describes, initialised from the current torch RNG state."""
    layout = TokenLayout(config.data.state_dim, config.data.num_labels)
    m = config.model
    return RecallGPT2(layout.dim, config.data.state_dim, m.n_embd, m.n_layer, m.n_head, config.n_positions,
                      m.attention)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared L2 error of the next state summed over unmasked positions ÷ their number (label targets masked)."""
    squared = ((pred - target) ** 2).sum(dim=-1)
    weight = mask.to(squared.dtype)
    return (squared * weight).sum() / weight.sum().clamp_min(1.0)
