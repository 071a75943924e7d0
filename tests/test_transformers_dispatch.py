"""transformers attention found by dispatch: each argument and mask honoured or refused by name, exact attention
with soft-capping and sinks against the formula, cross-attention left alone, and decoder layers a token flow
re-runs found by their forward's pattern (and re-run exactly)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fnabench
from fnabench.patching.families.transformers import FAMILIES
from fnabench.patching.sites import BlockSite
from fnabench.patching.transformers import UnsupportedLayerError, _install_decoder_block, decoder_layer_problem
from fnabench.patching.transformers_attention import (
    Call,
    UnsupportedAttentionError,
    describe_mask,
    exact_attention,
    fnabench_attention,
)
from fnabench.variants import ForwardState

transformers = pytest.importorskip("transformers")
DECODERS = {f.name: f for f in FAMILIES if f.role == "decoder" and f.refused is None}
#: families whose layers are the pre-norm pattern, and those that differ (each with what differs)
PRE_NORM = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "olmo", "phi3", "gemma", "helium",
            "smollm3"}
NOT_PRE_NORM = {"olmo2": "no input_layernorm", "granite": "residual_multiplier",
                "gemma2 (attn_logit_softcapping=None)": "not the pre-norm", "cohere": "no post_attention",
                "gpt2": "no input_layernorm", "gpt_neox": "no self_attn", "stablelm": "not the pre-norm"}


def _qkv(b=1, h=2, n=6, d=4, dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g),
            torch.randn(b, h, n, dv or d, generator=g))


def test_exact_attention_soft_caps_and_sinks_as_the_formula_says():
    q, k, v = _qkv()
    scale, cap = 0.5, 2.0
    sinks = torch.tensor([0.3, -1.0])
    logits = cap * torch.tanh((q @ k.transpose(-1, -2)) * scale / cap)
    logits = logits.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    sink = sinks.reshape(1, 2, 1, 1).expand(1, 2, 6, 1)
    weights = torch.softmax(torch.cat([logits, sink], -1), -1)[..., :-1]  # the sink takes mass, gives no value
    want = weights @ v
    got = exact_attention(q, k, v, None, Call(scaling=scale, causal=True, softcap=cap, sinks=sinks))
    torch.testing.assert_close(got, want)
    assert (weights.sum(-1) < 1).all()


def test_exact_attention_takes_value_heads_of_their_own_size():
    q, k, v = _qkv(dv=3)
    got = exact_attention(q, k, v, None, Call(scaling=None, causal=False))
    assert got.shape == (1, 2, 6, 3)
    torch.testing.assert_close(got, torch.softmax(q @ k.transpose(-1, -2) / 2, -1) @ v)


@pytest.mark.parametrize("mask, causal, words", [
    (torch.ones(6, 6, dtype=torch.bool).tril() & torch.tensor([False, False] + [True] * 4), True, "left-padded"),
    (torch.ones(6, 6, dtype=torch.bool).tril() & ~torch.ones(6, 6, dtype=torch.bool).tril(-3), True,
     "sliding-window mask (window 3)"),
    (torch.ones(6, 6, dtype=torch.bool), True, "see later ones"),
    ((torch.arange(6)[:, None] + torch.arange(6)[None]) % 2 == 0, False, "custom attention mask"),
    (torch.ones(6, 6, dtype=torch.bool) & torch.tensor([True] * 5 + [False]), False, "a padding mask"),
    (-torch.arange(6.0)[None].expand(6, 6).clone(), False, "ALiBi"),
])
def test_a_mask_is_named_for_what_it_is(mask, causal, words):
    assert words in describe_mask(mask[None, None], causal)


class _Module(nn.Module):
    is_causal = True


def test_an_argument_fnabench_does_not_know_is_refused_by_name():
    q, k, v = _qkv()
    with pytest.raises(UnsupportedAttentionError, match=r"cu_seq_lens_q.*would drop"):
        fnabench_attention(_Module(), q, k, v, None, cu_seq_lens_q=torch.tensor([0, 6]))
    with pytest.raises(UnsupportedAttentionError, match=r"dropout 0\.1.*model\.eval"):
        fnabench_attention(_Module(), q, k, v, None, dropout=0.1)
    out, _ = fnabench_attention(_Module(), q, k, v, None, position_ids=torch.arange(6), output_attentions=False)
    torch.testing.assert_close(out.transpose(1, 2), torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True))


def test_cross_attention_is_not_a_site():
    cfg = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=64)
    model = transformers.BartModel(cfg).eval()
    with fnabench.patch(model, "exact", ) as handle:
        names = [s.name for s in handle.sites]
    assert names and not any("encoder_attn" in n for n in names)
    assert any("decoder.layers.0.self_attn" in n for n in names) and any("encoder.layers.0" in n for n in names)


def test_the_windowed_layer_runs_exact_and_the_global_one_fna():
    model, x, out = DECODERS["gemma3 (sliding_window=16)"].make()
    with torch.no_grad(), fnabench.patch(model, "fna:m=4") as handle:
        out(model, x)
        assert handle.states["image"].exact_because == {0: "sliding window 16 over 40 tokens"}
        out(model, x[:, :12])  # shorter than the window: it does not bind, FNA runs in both layers
        assert handle.states["image"].exact_because == {}


class _IdentityFlow:
    def enter(self, layer, x):
        pass

    def between(self, layer, x):
        return x


@pytest.mark.parametrize("name", sorted(PRE_NORM | set(NOT_PRE_NORM)))
def test_decoder_layers_are_found_by_their_forward(name):
    model, x, out = DECODERS[name].make()
    layers = [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")] or \
        [m for m in model.modules() if type(m).__name__.endswith(("Block", "DecoderLayer", "Layer"))
         and hasattr(m, "attn" if name == "gpt2" else "attention")]
    assert layers
    problem = decoder_layer_problem(layers[0])
    if name in NOT_PRE_NORM:
        assert problem is not None and NOT_PRE_NORM[name] in problem and "\n" not in problem, problem
        state = ForwardState(tower="text", num_layers=len(layers), flow=_IdentityFlow())
        with pytest.raises(UnsupportedLayerError, match=type(layers[0]).__name__):
            _install_decoder_block(BlockSite(layers[0], 0, state))
        return
    assert problem is None
    with torch.no_grad():
        before = out(model, x)
        state = ForwardState(tower="text", num_layers=len(layers), flow=_IdentityFlow())
        undo = [_install_decoder_block(BlockSite(layer, i, state)) for i, layer in enumerate(layers)]
        try:  # the layer as a token flow re-runs it, with a flow that keeps every token: the model's own output
            torch.testing.assert_close(out(model, x), before, rtol=0, atol=1e-6)
        finally:
            for u in undo:
                u()
