"""Known-answer tests of the massive/artifact-token analysis and the suppression ablation.

The constructed ViT (timm, 32 px, 8 px patches: CLS, one register and a 4×4 grid, 18 tokens) has every
weight zero but its LayerNorms and position embeddings, so each token's residual stream is its position
embedding: 15 patch rows of norm exactly 1 and mean 0, one massive row (+300 in feature 0) and two
artifact rows (norm exactly 6). Its attention weights are planted: every query of head 1 attends to
feature 0 (so the massive token is its sink), head 0 routes two selector tokens to the same keys and
copies a payload from whichever token they attend. Nothing is eyeballed: norms, ratios, kinds, grid
positions, attention shares and the ablation's emergence and takeover follow from the construction.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fnabench.analysis import KINDS, AnalysisInputError, Thresholds, analyze
from fnabench.analysis.ablation import ablate, mask_spec

D, HEADS, TOKENS = 32, 2, 18
MASSIVE, DORMANT, ARTIFACTS, SELECTORS = 7, 9, (12, 17), (12, 17)


def _vit(depth: int = 2):
    """The zero-weight ViT with unit, zero-mean position rows (module docstring)."""
    vt = pytest.importorskip("timm.models.vision_transformer")
    model = vt.VisionTransformer(img_size=32, patch_size=8, embed_dim=D, depth=depth, num_heads=HEADS,
                                 mlp_ratio=2, reg_tokens=1, num_classes=0).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.zero_()
        rows = torch.zeros(TOKENS, D)
        rows[:, 4:] = torch.randn(TOKENS, D - 4, generator=gen)
        rows[:, 4:] -= rows[:, 4:].mean(dim=1, keepdim=True)
        model.pos_embed.copy_((rows / rows.norm(dim=1, keepdim=True))[None])
    return model


def _detector_model():
    """Massive token (feature 0 = 300) that head 0 of every block attends to; two artifact patches (norm 6)."""
    model = _vit()
    with torch.no_grad():
        model.pos_embed[0, MASSIVE, 0] = 300.0
        for p in ARTIFACTS:
            model.pos_embed[0, p] *= 6.0
        for blk in model.blocks:
            blk.attn.qkv.weight[D + 0, 0] = 1.0  # head 0 key reads feature 0
            blk.attn.qkv.bias[0] = 10.0  # every head-0 query points at it; head 1 stays uniform
    return model


def _ablation_model(depth: int = 3):
    """Massive token (sink of head 1 for every query), a dormant token second in line, and two selector
    tokens whose head-0 queries attend to the same keys and copy that token's payload into feature 3."""
    model = _vit(depth)
    with torch.no_grad():
        model.pos_embed[0, MASSIVE, 0] = 300.0
        model.pos_embed[0, DORMANT, 1] = 0.5
        for p in SELECTORS:
            model.pos_embed[0, p, 2] = 0.8
        hd = D // HEADS
        for blk in model.blocks:
            w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
            for head in (0, 1):
                w[D + head * hd, 0] = w[D + head * hd, 1] = 1.0  # keys: massive first, dormant second
            w[0, 2] = 4.0  # head 0: only selector tokens query
            w[2 * D, 1] = 2.0  # head 0 values: the dormant token's payload
            b[hd] = 4.0  # head 1: every token queries
            blk.attn.proj.weight[3, 0] = 1.0  # head 0's output lands in feature 3
    return model


def _images(count: int = 3) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _own_attention(model, images: torch.Tensor) -> list[torch.Tensor]:
    """Each block's attention probabilities [B, H, N, N] from timm's own (unfused) code path, no fnabench."""
    probs = []
    hooks = [blk.attn.attn_drop.register_forward_hook(lambda _m, _i, out: probs.append(out.detach()))
             for blk in model.blocks]
    fused = [blk.attn.fused_attn for blk in model.blocks]
    for blk in model.blocks:
        blk.attn.fused_attn = False
    try:
        with torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
        for blk, was in zip(model.blocks, fused, strict=True):
            blk.attn.fused_attn = was
    return probs


def test_planted_massive_and_artifact_tokens_are_found_where_they_were_planted():
    model = _detector_model()
    report = analyze(model, _images(), name="planted")
    assert report.num_prefix == 2 and report.prefix_kinds == ["CLS", "register"] and report.grid == (4, 4)
    # every residual state is the embedding: median patch norm 1, artifacts exactly 6×, massive √(300² + 1)×
    np.testing.assert_allclose(report.median_norm, 1.0, rtol=1e-5)
    np.testing.assert_allclose(report.ratio[:, :, list(ARTIFACTS)], 6.0, rtol=1e-5)
    np.testing.assert_allclose(report.ratio[:, :, MASSIVE], np.hypot(300.0, 1.0), rtol=1e-5)
    assert report.massive[:, :, MASSIVE].all() and report.massive.sum() == report.count * (report.depth + 1)
    assert report.massive_activation[:, :, MASSIVE].all() and (report.arrays["max_dim"][:, :, MASSIVE] == 0).all()
    assert report.artifact[:, :, list(ARTIFACTS)].all()
    assert report.artifact.sum() == 2 * report.count * (report.depth + 1)
    expected = np.full(TOKENS, -1)
    expected[[0, 1, MASSIVE, *ARTIFACTS]] = [KINDS.index(k) for k in ("CLS", "register", "massive", "artifact",
                                                                      "artifact")]
    assert (report.kind == expected).all()
    rows = {(r["token"], r["kind"]): r for r in report.listed() if r["index"] == 0}
    assert rows[(12, "artifact")]["grid"] == [2, 2] and rows[(17, "artifact")]["grid"] == [3, 3]
    assert rows[(MASSIVE, "massive")]["grid"] == [1, 1] and rows[(MASSIVE, "massive")]["activation_dim"] == 0
    kinds = report.kinds_summary()
    assert kinds["massive"]["stable_positions"] == [MASSIVE] and kinds["massive"]["activation_dims"] == [[0, 3]]
    assert kinds["artifact"]["per_input"] == 2 and kinds["artifact"]["stable_positions"] == list(ARTIFACTS)
    hits = report.activations()
    assert {(h["token"], h["dim"]) for h in hits} == {(MASSIVE, 0)} and len(hits) == 3 * 3
    m = report.metrics()
    assert m["massive_tokens"] == 1 and m["artifact_tokens"] == 2 and m["artifact_percent"] == pytest.approx(12.5)


def test_sink_share_is_the_planted_attention_and_matches_timms_own_probabilities():
    model = _detector_model()
    images = _images()
    report = analyze(model, images)
    received = report.arrays["received"]  # [I, L, H, N]
    np.testing.assert_allclose(received[:, :, 1], 1 / TOKENS, rtol=1e-6)  # head 1: uniform by construction
    assert (received[:, :, 0, MASSIVE] > 0.999).all()  # head 0: the massive token is the sink
    np.testing.assert_allclose(report.shares["massive"][:, :, 1], 1 / TOKENS, rtol=1e-6)
    np.testing.assert_allclose(report.shares["detected"][:, :, 1], 3 / TOKENS, rtol=1e-6)
    np.testing.assert_allclose(report.shares["prefix"][:, :, 1], 2 / TOKENS, rtol=1e-6)
    assert (report.top_token[:, :, 0] == MASSIVE).all() and report.sink[:, :, 0, MASSIVE].all()
    truth = torch.stack(_own_attention(model, images), dim=1).mean(dim=-2).numpy()
    np.testing.assert_allclose(received, truth, atol=1e-6)


def test_received_attention_matches_each_hosts_own_probabilities_on_random_models():
    """Random weights (no planted structure): timm's unfused probabilities and GPT-2's eager attentions."""
    tr = pytest.importorskip("transformers")
    from conftest import tiny_timm

    vit = tiny_timm(fused=True)
    images = torch.randn(2, 3, 32, 32)
    truth = torch.stack(_own_attention(vit, images), dim=1).mean(dim=-2).numpy()
    np.testing.assert_allclose(analyze(vit, images).arrays["received"], truth, atol=1e-5)

    torch.manual_seed(0)
    config = tr.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=50)
    config._attn_implementation = "eager"
    lm = tr.GPT2Model(config).eval()
    ids = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        own = lm(ids, output_attentions=True).attentions
    report = analyze(lm, ids)
    assert report.causal and report.num_prefix == 0 and report.grid is None
    np.testing.assert_allclose(report.arrays["received"], torch.stack(own, 1).mean(dim=-2).numpy(), atol=1e-5)
    assert report.uniform_share(0) == pytest.approx(sum(1 / (t + 1) for t in range(12)) / 12)


def test_ablating_the_massive_token_makes_the_selectors_artifacts_and_the_dormant_token_the_sink():
    model = _ablation_model()
    images = _images()
    ab = ablate(model, images, "massive")
    before, after = ab.before, ab.after
    assert not before.artifact.any() and before.kinds_summary().keys() == {"CLS", "register", "massive"}
    # the mask variant removed exactly the massive token, in every block
    masked = after.arrays["masked"]
    assert masked[:, :, MASSIVE].all() and masked.sum() == masked.shape[0] * masked.shape[1]
    # with the sink gone the selectors copy the dormant token's payload: they, and only they, become artifacts
    assert not after.artifact[:, 0].any()
    assert after.artifact[:, 1:, list(SELECTORS)].all() and after.artifact.sum() == 2 * 3 * 3
    assert [KINDS[k] for k in after.kind[0, list(SELECTORS)]] == ["artifact", "artifact"]
    rows = ab.per_layer()
    assert [r["emerged"] for r in rows] == [0, 2, 2, 2] and rows[1]["artifact_before"] == 0
    # head 1 loses its sink in every block and the dormant token takes it over
    assert (before.top_token[:, :, 1] == MASSIVE).all() and (after.top_token[:, :, 1] == DORMANT).all()
    assert all(r["lost"] == 3 and r["taken"] == 3 and r["new_sinks"] == [[DORMANT, 3]]
               and r["new_sink_kinds"] == {"dormant": 3} for r in rows[:-1])
    m = ab.metrics()
    assert m["takeover_percent"] == 100 and m["emerged_tokens"] == 2 and 0.99 < m["cos_sim"] < 0.99999
    assert m["artifact_tokens"] == 2 and before.metrics()["artifact_tokens"] == 0
    text = " ".join(ab.verdict())
    assert "newly became artifact" in text and "taken over by another token in 100 %" in text and "dormant 9" in text


def test_zeroing_values_leaves_attention_where_it_was_so_nothing_emerges():
    """Action values: the massive token keeps its attention but carries nothing, so no payload is copied."""
    model = _ablation_model()
    images = _images()
    ab = ablate(model, images, "massive", action="values")
    np.testing.assert_allclose(ab.after.arrays["received"][:, 0], ab.before.arrays["received"][:, 0], atol=1e-6)
    assert not ab.after.artifact.any() and ab.metrics()["takeover_percent"] == 0
    rows = [r for r in ab.per_layer() if "lost" in r]
    assert all(r["lost"] == r["kept"] == 3 for r in rows) and "still the head's most attended token in 100 %" in \
        " ".join(ab.verdict())
    assert ab.spec.startswith("exact:impl=sdpa+mask:action=values")


def test_ablating_the_first_token_of_a_decoder_leaves_it_only_its_own_query():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    lm = tr.GPT2Model(tr.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=50)).eval()
    with torch.no_grad():
        lm.wpe.weight[0, 5] = 300.0  # position 0 carries a massive activation in feature 5
    ids = torch.randint(0, 50, (2, 10))
    ab = ablate(lm, ids, "first")
    assert (ab.before.kind[:, 0] == KINDS.index("massive")).all()
    assert (ab.before.arrays["max_dim"][:, :, 0] == 5).all() and ab.before.massive_activation[:, :, 0].all()
    # removed as a key, position 0 is attended only by itself (probability 1), so it receives 1/N
    np.testing.assert_allclose(ab.after.arrays["received"][..., 0], 1 / 10, rtol=1e-6)
    assert ab.after.arrays["masked"][:, :, 0].all() and ab.after.arrays["masked"].sum() == 2 * 2
    line = " ".join(ab.before.verdict())
    assert "First token:" in line and "uniform causal attention would give it" in line


def test_a_model_without_outliers_says_so_and_an_ablation_that_finds_nothing_says_so():
    model = _vit()
    report = analyze(model, _images(2))
    assert report.verdict()[0].startswith("No outlier tokens:") and report.metrics()["massive_tokens"] == 0
    ab = ablate(model, _images(2), "artifact", before=report)
    assert "removes nothing here" in ab.verdict()[0] and ab.metrics()["cos_sim"] == pytest.approx(1.0)


def test_thresholds_change_what_is_detected():
    model = _detector_model()
    report = analyze(model, _images(1), thresholds=Thresholds(artifact_ratio=7, massive_ratio=500))
    assert not report.artifact.any() and not report.token_sets["detected"][:, list(ARTIFACTS)].any()
    assert report.massive[:, :, MASSIVE].all()  # its massive activation alone makes it massive
    with pytest.raises(AnalysisInputError, match="artifact ratio"):
        analyze(model, _images(1), thresholds=Thresholds(artifact_ratio=30))


def test_bad_requests_are_one_line_errors():
    model = _detector_model()
    with pytest.raises(AnalysisInputError, match="exact attention, optionally with a mask"):
        analyze(model, _images(1), variant="fna:m=4")
    with pytest.raises(AnalysisInputError, match="accepted: massive, artifact, first"):
        mask_spec("sinks")
    with pytest.raises(AnalysisInputError, match="bare module"):
        analyze(model, ["not an image"])
    assert not hasattr(model, "_fnabench_patch") or not model._fnabench_patch.active  # nothing left patched


def test_report_files_are_written_and_json_is_plain(tmp_path):
    pytest.importorskip("matplotlib")
    from fnabench.analysis.outputs import write_ablation, write_report

    model = _ablation_model(depth=2)
    ab = ablate(model, _images(2), "massive")
    files = {p.name for p in write_report(ab.before, tmp_path, images=list(_images(2)))}
    files |= {p.name for p in write_ablation(ab, tmp_path, images=list(_images(2)))}
    assert {"summary.json", "layers.csv", "heads.csv", "tokens.csv", "token_norms.csv", "arrays.npz",
            "norms_by_layer.png", "token_norms.png", "sink_share.png", "ablation-massive-keys.json",
            "ablation-massive-keys.png", "ablation-massive-keys-maps.png"} <= files
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["kinds"]["massive"]["stable_positions"] == [MASSIVE]
    assert len((tmp_path / "token_norms.csv").read_text().splitlines()) == 1 + 2 * 3 * TOKENS
    with np.load(tmp_path / "arrays.npz") as arrays:
        assert arrays["received"].shape == (2, 2, HEADS, TOKENS)
