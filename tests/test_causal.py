"""Causal attention variants: the future never reaches the past, and exactness where it must hold."""

from __future__ import annotations

import pytest
import torch
from conftest import perturbed_after

import fnabench
from fnabench.variants import ForwardState, parse_variant
from fnabench.variants.causal import causal_fna_attention, causal_segment_attention, stride_positions

tr = pytest.importorskip("transformers")


def _exact_causal(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _rel(a, b) -> float:
    err = ((a - b).norm() / b.norm()).item()
    assert err == err, "NaN"
    return err


def _qkv(n=48, b=2, h=3, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) * 0.5 for _ in range(3))


# ---------------------------------------------------------------------------------------------
# the math


@pytest.mark.parametrize("inverse", ["exact", "ridge", "newton"])
def test_every_token_a_landmark_is_exact_causal_attention(inverse):
    q, k, v = _qkv()
    idx = torch.arange(q.shape[2])[None].expand(q.shape[0], -1)
    out = causal_fna_attention(q, k, v, idx, inverse=inverse, ridge=0.7, iters=30)
    assert _rel(out, _exact_causal(q, k, v)) < 1e-6
    assert _rel(causal_segment_attention(q, k, v, q.shape[2], inverse="exact"), _exact_causal(q, k, v)) < 1e-6


@pytest.mark.parametrize("spec", ["fna:m=8", "fna:m=8,landmarks=random,seed=3", "fna:m=1", "nystrom:m=6",
                                  "fna:m=8,pinv=exact", "fna:m=8,guarantee=0:5", "fna:m=8+mask:tokens=all",
                                  "mask:tokens=all,artifact_ratio=1.2", "mask:tokens=first",
                                  "fna:m=8+mask:tokens=first", "null"])
def test_future_tokens_never_change_earlier_outputs(spec):
    q, k, v = _qkv()
    residual = torch.randn(q.shape[0], q.shape[2], 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    residual[:, 5] *= 6  # a high-norm token for the mask to find
    variant = parse_variant(spec)

    def run(q, k, v, residual):
        state = ForwardState("text", 1, causal=True, only_tower=True)
        state.residual = residual
        return variant.attend(q, k, v, state, causal=True), state

    out, state = run(q, k, v, residual)
    assert torch.isfinite(out).all()
    for t in (0, 9, 30):
        later = residual.clone()
        later[:, t + 1:] *= 10
        changed, _ = run(*perturbed_after((q, k, v), t), later)
        assert _rel(changed[:, :, : t + 1], out[:, :, : t + 1]) <= 1e-6, t
    if variant.mask is not None:
        assert state.masked.any(), "the mask found nothing: the test would not exercise it"


def test_masking_the_first_token_removes_it_as_a_key():
    q, k, v = _qkv()
    state = ForwardState("text", 1, causal=True, only_tower=True)
    out = parse_variant("mask:tokens=first").attend(q, k, v, state, causal=True)
    keep = torch.ones(48, 48, dtype=torch.bool).tril()
    keep[1:, 0] = False
    assert _rel(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)) < 1e-12


def test_whole_sequence_selectors_leak_and_say_so():
    q, k, v = _qkv()
    variant = parse_variant("fna:m=8,landmarks=fps")
    assert variant.leaks_future and not parse_variant("fna:m=8").for_causal().leaks_future
    state = ForwardState("text", 1, causal=True, only_tower=True)
    out = variant.attend(q, k, v, state, causal=True)
    changed = variant.attend(*perturbed_after((q, k, v), 9), ForwardState("text", 1, causal=True, only_tower=True),
                             causal=True)
    assert _rel(changed[:, :, :10], out[:, :, :10]) > 1e-3  # this test would catch a leak


def test_causal_defaults_are_named_in_the_resolved_string():
    resolved = parse_variant("fna:m=16").for_causal()
    assert resolved.core["landmarks"] == "stride" and resolved.core["pinv"] == "ridge"
    named = parse_variant("fna:m=16,landmarks=random,pinv=exact").for_causal()
    assert named.core["landmarks"] == "random" and named.core["pinv"] == "exact"
    # re-parsing the resolved canonical string gives the same variant (records stay identities)
    assert parse_variant(resolved.canonical).for_causal().canonical == resolved.canonical


def test_keys_added_later_leave_old_identities_unchanged():
    old = ("fna:exclude=none,features=q,guarantee=prefix,iters=6,landmarks=fps,layers=:,m=16,norm_ratio=3,"
           "pinv=newton,rcond=auto,resample=false,seed=0,tower=image")
    assert parse_variant("fna:m=16,pinv=newton").canonical == old  # (newton was FNA's default when it ran)
    assert "cache=full" in parse_variant("fna:m=16,cache=full").canonical


def test_stride_positions_hold_the_sink_and_the_guaranteed_span():
    pos = stride_positions(100, 8)
    assert pos[0] == 0 and len(pos) == 8 and pos[-1] == 99 and (pos.diff() > 0).all()
    guarantee = torch.zeros(100, dtype=torch.bool)
    guarantee[40:44] = True
    pos = stride_positions(100, 8, guarantee=guarantee)
    assert {0, 40, 41, 42, 43} <= set(pos.tolist()) and len(pos) == 8
    assert stride_positions(5, 8).tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# decoder hosts


def _gpt2():
    torch.manual_seed(0)
    return tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=128)).eval()


def _llama(kv_heads=2):
    torch.manual_seed(0)
    cfg = tr.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128)
    return tr.LlamaForCausalLM(cfg).eval()


def _others():
    torch.manual_seed(0)
    common = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    return {
        "qwen2": tr.Qwen2ForCausalLM(tr.Qwen2Config(**common)),
        "mistral": tr.MistralForCausalLM(tr.MistralConfig(**common, sliding_window=None)),
        "olmo": tr.OlmoForCausalLM(tr.OlmoConfig(**common, pad_token_id=0)),
        "olmo2": tr.Olmo2ForCausalLM(tr.Olmo2Config(**common, pad_token_id=0)),
    }


def _ids(n=40, seed=0):
    return torch.randint(1, 61, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_patched_lm_is_causal_and_exact_where_it_must_be(make):
    lm = make()
    ids = _ids()
    with torch.no_grad():
        ref = lm(ids).logits
        with fnabench.patch(lm, "exact"):
            assert (lm(ids).logits - ref).abs().max() < 1e-5
        with fnabench.patch(lm, "fna:m=64"):  # every token a landmark: the exact path
            assert (lm(ids).logits - ref).abs().max() < 1e-5
        with fnabench.patch(lm, "fna:m=8") as handle:
            assert handle.variant.core["landmarks"] == "stride"  # no tower=, causal-safe default
            assert len(handle.sites) == 2
            out = lm(ids).logits
            assert (out - ref).abs().max() > 1e-4  # it does approximate
            for t in (3, 17, 30):
                later = ids.clone()
                gen = torch.Generator().manual_seed(t)
                later[:, t + 1:] = torch.randint(1, 61, later[:, t + 1:].shape, generator=gen)
                assert _rel(lm(later).logits[:, : t + 1], out[:, : t + 1]) <= 1e-6
    assert (lm(ids).logits - ref).abs().max() == 0  # removed


@pytest.mark.parametrize("name", ["qwen2", "mistral", "olmo", "olmo2"])
def test_other_decoders_patch_and_stay_causal(name):
    lm = _others()[name].eval()
    ids = _ids(24)
    with torch.no_grad():
        ref = lm(ids).logits
        with fnabench.patch(lm, "exact"):
            assert (lm(ids).logits - ref).abs().max() < 1e-5
        with fnabench.patch(lm, "fna:m=6"):
            out = lm(ids).logits
            later = ids.clone()
            later[:, 11:] = 5
            assert _rel(lm(later).logits[:, :11], out[:, :11]) <= 1e-6


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("cache", ["landmark", "full"])
def test_generation_with_every_token_a_landmark_equals_unpatched(make, cache):
    lm = make()
    ids = _ids(20)[:1]
    ref = lm.generate(ids, max_new_tokens=8, do_sample=False)
    with fnabench.patch(lm, f"fna:m=32,cache={cache}"):
        out = lm.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("make", [_gpt2, lambda: _llama(kv_heads=4)], ids=["gpt2", "llama"])
def test_landmark_cache_decodes_as_the_prefill_rule_would(make):
    """With landmarks fixed (the first 4 tokens), a decode step on the landmark cache gives the logits
    a prefill of the longer sequence gives at its last token: the cache keeps the prefill's rule."""
    from fnabench.patching.kv_cache import cache_bytes

    lm = make()
    ids = _ids(30)[:1]
    spec = "fna:m=4,guarantee=0:4"
    with torch.no_grad(), fnabench.patch(lm, spec):
        pre = lm(ids[:, :-1], use_cache=True)
        step = lm(ids[:, -1:], cache=pre.past_key_values, use_cache=True)
        whole = lm(ids).logits[:, -1]
    assert _rel(step.logits[:, -1], whole) < 1e-5
    with torch.no_grad():
        full = lm(ids[:, :-1], use_cache=True).past_key_values
        with fnabench.patch(lm, "fna:m=4"):  # stride landmarks end at the last token: 4 kept of 29
            small = lm(ids[:, :-1], use_cache=True).past_key_values
        assert small.get_seq_length() == full.get_seq_length() == 29  # positions go on as if all were there
        assert cache_bytes(small) * 29 == cache_bytes(full) * 4


def test_padding_is_honoured_by_exact_and_refused_by_approximations():
    from fnabench.patching.transformers import PaddingMaskError

    lm = _llama()
    ids = _ids(16)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    with torch.no_grad():
        ref = lm(ids, attention_mask=mask).logits
        with fnabench.patch(lm, "exact"):
            assert (lm(ids, attention_mask=mask).logits - ref).abs().max() < 1e-5
        with fnabench.patch(lm, "fna:m=4"), pytest.raises(PaddingMaskError, match="padding mask"):
            lm(ids, attention_mask=mask)


def test_recall_gpt2_patches_like_any_decoder():
    from fnabench.tasks.recall.network import RecallGPT2

    torch.manual_seed(0)
    model = RecallGPT2(token_dim=5, state_dim=2, n_embd=32, n_layer=2, n_head=2, n_positions=64).eval()
    x = torch.randn(2, 40, 5)
    with torch.no_grad():
        ref = model(x)
        with fnabench.patch(model, "fna:m=8") as handle:
            assert handle.states and all(s.causal for s in handle.states.values())
            out = model(x)
            later = x.clone()
            later[:, 21:] += 1
            assert _rel(model(later)[:, :21], out[:, :21]) <= 1e-6
            assert (out - ref).abs().max() > 1e-5


# ---------------------------------------------------------------------------------------------
# the recall suite as harness cells


def test_recall_cells_run_causal_variants_and_say_which_see_the_future(tmp_path, monkeypatch):
    from fnabench.harness.config import load as load_config
    from fnabench.harness.leaderboard import render
    from fnabench.harness.records import read_records
    from fnabench.harness.runner import run_sweep

    monkeypatch.setenv("FNABENCH_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(f'''name = "recall-wiring"
models = ["recall:smoke@seed0"]
tasks = ["recall:none,misdirected"]
variants = ["exact", "fna:m=8", "fna:m=8,landmarks=fps", "mask:tokens=first"]
timing_repeats = 1
timing_warmup = 0
out = "{tmp_path / 'out'}"
''')
    summary = run_sweep(load_config(cfg), quiet=True)
    assert summary.ok and len(summary.ran) == 4
    records = {r["variant_short"]: r for r in read_records(tmp_path / "out")}
    assert set(records) == {"exact", "fna:landmarks=stride,m=8",
                            "fna:landmarks=fps,m=8 (sees the future)", "mask:tokens=first"}
    assert records["fna:landmarks=stride,m=8"]["causal"] == {"leaks_future": False}
    assert records["fna:landmarks=fps,m=8 (sees the future)"]["causal"] == {"leaks_future": True}
    exact = records["exact"]
    assert set(exact["metrics"]) == {f"{p}err_k{k}" for p in ("", "misdirected_") for k in (1, 2, 3)}
    assert exact["flops"]["per"] == "trace" and exact["flops"]["attention"] > 0
    assert exact["metrics"] != records["fna:landmarks=stride,m=8"]["metrics"]
    # what decoding would keep: the full cache for exact and masking, the landmark cache for FNA
    fna = records["fna:landmarks=stride,m=8"]
    assert exact["kv_cache"]["bytes"] == exact["kv_cache"]["full_bytes"] > 0
    assert records["mask:tokens=first"]["kv_cache"]["bytes"] == exact["kv_cache"]["full_bytes"]
    n = exact["kv_cache"]["prefill_tokens"]
    assert n > 8 and fna["kv_cache"]["full_bytes"] == exact["kv_cache"]["full_bytes"]
    assert fna["kv_cache"]["bytes"] < exact["kv_cache"]["bytes"]
    assert 0 < fna["kv_cache"]["decode_attention_gflops"] < exact["kv_cache"]["decode_attention_gflops"]
    table = render(read_records(tmp_path / "out"))
    assert "KV cache % of full" in table and "decode-step GFLOPs" in table
    assert "kv_cache_percent" in render(read_records(tmp_path / "out"), "csv").splitlines()[0]
    # the trained model is cached by config hash: a second sweep trains nothing and repeats the numbers
    again = run_sweep(load_config(cfg), quiet=True)
    assert again.ran == [] and len(again.skipped) == 4


def test_fallback_auto_in_a_decoder_runs_exact_where_the_causal_kernel_costs_more():
    """Short prompts: causal FNA's grouped kernel counts more FLOPs than exact, so fallback=auto runs exact
    and generation equals the unpatched model's; a long prompt is approximated."""
    lm = _llama()
    short = _ids(12)[:1]
    ref = lm.generate(short, max_new_tokens=4, do_sample=False)
    with fnabench.patch(lm, "fna:m=4,fallback=auto") as handle:
        out = lm.generate(short, max_new_tokens=4, do_sample=False)
        assert handle.states[next(iter(handle.states))].approximated == {0: False, 1: False}
    assert torch.equal(out, ref)
    with fnabench.patch(lm, "fna:m=4,fallback=auto") as handle, torch.no_grad():
        lm(_ids(120)[:1])
        assert handle.states[next(iter(handle.states))].approximated == {0: True, 1: True}
