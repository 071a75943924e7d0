"""ToMe (token merging) as a token-flow variant: the matching, merging and unmerging math against plain
loops, exactness where merging loses nothing (r = 0; twin tokens with proportional attention), FLOPs
that fall with r, undo, and the hosts it patches (timm, open_clip, transformers)."""

from __future__ import annotations

import pytest
import torch

import fnabench
from fnabench.models.registry import load_model
from fnabench.variants import SpecError, parse_variant
from fnabench.variants.tome import merge, plan_merge, unmerge


def _naive_merge(x, size, metric, r, prefix):
    """The paper's algorithm with Python loops, one image at a time: (merged tokens, sizes, where)."""
    outs, sizes, wheres = [], [], []
    for xb, sb, mb in zip(x, size, metric, strict=True):
        n = xb.shape[0]
        rest = list(range(prefix, n))
        a, b = rest[::2], rest[1::2]
        unit = mb / mb.norm(dim=-1, keepdim=True)
        best = {i: max(b, key=lambda j, i=i: float(unit[i] @ unit[j])) for i in a}
        score = {i: float(unit[i] @ unit[best[i]]) for i in a}
        merged = sorted(a, key=lambda i: -score[i])[:r]
        kept = [i for i in a if i not in merged]
        order = list(range(prefix)) + kept + b
        tokens, weights = [], []
        for pos in order:
            members = [pos] + ([i for i in merged if best[i] == pos] if pos in b else [])
            w = sum(sb[i] for i in members)
            tokens.append(sum(xb[i] * sb[i] for i in members) / w)
            weights.append(w)
        where = [order.index(best[p]) if p in merged else order.index(p) for p in range(n)]
        outs.append(torch.stack(tokens))
        sizes.append(torch.stack(weights))
        wheres.append(torch.tensor(where))
    return torch.stack(outs), torch.stack(sizes), torch.stack(wheres)


@pytest.mark.parametrize(("n", "r", "prefix"), [(11, 3, 1), (12, 5, 0), (9, 4, 2), (17, 8, 1)])
def test_bipartite_merge_matches_the_papers_algorithm_written_as_loops(n, r, prefix):
    g = torch.Generator().manual_seed(n * 10 + r)
    x = torch.randn(2, n, 6, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (2, n, 1), generator=g).double()
    metric = torch.randn(2, n, 5, generator=g, dtype=torch.float64)
    plan = plan_merge(metric, r, prefix)
    out, new_size = merge(x, size, plan)
    ref, ref_size, ref_where = _naive_merge(x, size, metric, r, prefix)
    assert out.shape[1] == n - r == plan.tokens_after
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(new_size, ref_size)
    where = plan.new_index(n)
    assert torch.equal(where, ref_where)
    # unmerging puts each merged token back at every position it absorbed
    torch.testing.assert_close(unmerge(out, where), torch.stack([ref[b][ref_where[b]] for b in range(2)]))
    assert new_size.sum() == size.sum()  # sizes count the input positions each token stands for


def test_merging_zero_tokens_or_more_than_set_a_holds():
    metric = torch.randn(1, 7, 4)
    assert plan_merge(metric, 0, 1) is None
    assert plan_merge(metric, 100, 1).tokens_after == 4  # r capped at |A| = 3 of the 6 non-prefix tokens
    assert plan_merge(torch.randn(1, 2, 4), 5, 1) is None  # one token after the prefix: nothing to pair


def test_spec_grammar_for_token_flow():
    v = parse_variant("tome:r=13")
    assert v.short == "tome:r=13" and v.flow is not None and not v.is_exact
    assert parse_variant(v.canonical) == v and "tome:" in v.canonical
    assert parse_variant("tome").short == "tome:r=8"
    for bad, words in (("tome:r=-1", "an integer >= 0"), ("tome:r=8+fna:m=64", "exact attention only"),
                       ("tome+mask", "exact attention only"), ("tome:tower=text", "accepted: image")):
        with pytest.raises(SpecError, match=words):
            parse_variant(bad)


def _expected_counts(n: int, r: int, blocks: int, prefix: int) -> list[int]:
    out = []
    for _ in range(blocks):
        out.append(n)
        rest = n - prefix
        n -= min(r, (rest + 1) // 2) if rest >= 2 else 0
    return out


@pytest.fixture(scope="module")
def tiny_vit():
    return load_model("tiny:vit", image_size=64)


@torch.no_grad()
def test_r0_is_exact_and_counted_gflops_fall_with_r(tiny_vit):
    model, x = tiny_vit.model, torch.randn(2, 3, 64, 64)
    with fnabench.patch(model, "exact"):
        ref = model.forward_features(x)
    with fnabench.patch(model, "tome:r=0"):
        assert torch.equal(model.forward_features(x), ref)
    gflops, errors = [], []
    for r in (0, 2, 4, 6):
        with fnabench.patch(model, f"tome:r={r}") as handle:
            out = model.forward_features(x)
            gflops.append(fnabench.count_flops(tiny_vit.embed, x[:1]).total)
            counts = handle.states["image"].flow.counts
        assert out.shape == ref.shape  # merged tokens are unmerged at the tower's end
        assert counts == _expected_counts(17, r, 6, prefix=1)  # r fewer per block while set A has r tokens
        errors.append(((out - ref).norm() / ref.norm()).item())
    assert gflops == sorted(gflops, reverse=True) and len(set(gflops)) == 4
    assert errors[0] == 0 and 0 < errors[1] < errors[3] and all(e == e for e in errors)


@torch.no_grad()
def test_merging_exact_twins_with_proportional_attention_changes_nothing(tiny_vit):
    """Twin tokens merged into one of size 2 attend and are attended to exactly as the pair did: with
    proportional attention and unmerging the output equals exact attention's; without it, it does not."""
    model = tiny_vit.model
    pos = model.pos_embed.data.clone()
    model.pos_embed.data.zero_()  # patch tokens then depend on pixels only
    try:
        half = torch.randn(2, 3, 64, 32)  # two 16-px patch columns, each shown twice: patches come in twins
        x = torch.cat([half[..., :16], half[..., :16], half[..., 16:], half[..., 16:]], dim=3)
        with fnabench.patch(model, "exact"):
            ref = model.forward_features(x)
        with fnabench.patch(model, "tome:r=8,layers=0") as handle:
            out = model.forward_features(x)
            assert handle.states["image"].flow.counts == [17, 9, 9, 9, 9, 9]
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
        with fnabench.patch(model, "tome:r=8,layers=0,prop_attn=false"):
            assert (model.forward_features(x) - ref).abs().max() > 1e-3
    finally:
        model.pos_embed.data.copy_(pos)


@pytest.mark.parametrize("name", ["tiny:dinov2", "tiny:open_clip", "tiny:hf-clip", "tiny:hf-dinov2", "tiny:hf-siglip"])
@torch.no_grad()
def test_tome_runs_in_every_host_and_undoes(name):
    loaded = load_model(name)
    x = torch.randn(2, 3, loaded.image_size, loaded.image_size)
    with fnabench.patch(loaded.model, "exact"):
        ref = loaded.embed(x)
    with fnabench.patch(loaded.model, "tome:r=0"):
        assert torch.equal(loaded.embed(x), ref)
    with fnabench.patch(loaded.model, "tome:r=6") as handle:
        out = loaded.embed(x)
        counts = handle.states["image"].flow.counts
        flops = fnabench.count_flops(loaded.embed, x[:1]).total
    assert counts[-1] < counts[0] and out.shape == ref.shape and torch.isfinite(out).all()
    assert 1e-4 < ((out - ref).norm() / ref.norm()).item() < 1
    assert flops < fnabench.count_flops(loaded.embed, x[:1]).total
    assert all("forward" not in m.__dict__ for m in loaded.model.modules())  # removed: original forwards back
    with fnabench.patch(loaded.model, "exact"):
        assert torch.equal(loaded.embed(x), ref)


def test_tome_refuses_decoders_in_one_line():
    pytest.importorskip("transformers")
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(fnabench.UnsupportedModelError, match="causal decoder"):
        fnabench.patch(model, "tome:r=2")
    assert all("forward" not in m.__dict__ for m in model.modules())


@torch.no_grad()
def test_tome_runs_in_the_fidelity_task_with_per_block_outputs_on_the_full_grid(tiny_vit):
    from fnabench.tasks.base import Settings
    from fnabench.tasks.fidelity import FidelityTask

    task = FidelityTask("synthetic", per_block=True, per_block_images=1, num_synthetic=2)
    settings = Settings(image_size=64, batch_size=2, limit=2)
    prepared = task.prepare(tiny_vit, settings)
    with fnabench.patch(tiny_vit.model, "tome:r=0"):
        assert task.evaluate(tiny_vit, prepared, settings)["rel_err_block5"] == 0
    with fnabench.patch(tiny_vit.model, "tome:r=3"):
        metrics = task.evaluate(tiny_vit, prepared, settings)
    assert 0 < metrics["rel_err_block1"] < metrics["rel_err_block5"] < 1 and metrics["cos_sim"] < 1
