"""LLaVA-family models: variants placed in the vision tower, the language model or both; the VisionZip- and
FastV-style token flows; all on a tiny random LLaVA saved as a normal transformers checkpoint."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import fnabench
from fnabench.data.generated import vqa as sc
from fnabench.models import llava
from fnabench.models.offline.llava_shapes_arch import TINY, save_tiny
from fnabench.patching.kv_cache import cache_bytes

N_IMAGE = TINY.image_tokens  # 16 patch tokens (17 in the tower with CLS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny(tmp_path_factory.mktemp("tiny-llava"))
    model, processor = llava.load_pretrained(str(folder))
    scenes = sc.scenes(3, seed=5)
    prompts = [llava.prompt_text(processor, s.questions()[-1].text) for s in scenes]
    inputs = llava.encode(processor, prompts[:1], [[scenes[0].image(TINY.image_size)]])
    return model, processor, inputs


def _logits(model, inputs):
    with torch.no_grad():
        return model(**llava.model_inputs(model, inputs)).logits


def test_place_maps_placements_onto_the_tower_and_refuses_contradictions():
    assert llava.place("fna:m=8", "vision").core["tower"] == "image"
    language = llava.place("fna:m=8", "language")
    assert language.core["tower"] == "text" and language.core["landmarks"] == "stride"  # causal-safe default
    assert llava.place("fna:m=8,landmarks=random", "both").core["landmarks"] == "random"  # named: kept
    assert llava.place("exact", "both").core["tower"] == "all"
    assert llava.place("exact+visionzip:tokens=8", "vision").flow["tokens"] == 8
    with pytest.raises(llava.PlacementError, match=r"accepted: image, text, all \(or their aliases vision, "
                                                    r"language, both\)"):
        llava.place("exact", "decoder")
    # one word: the spec's tower, given as the placement or in the spec itself, places the variant the same
    in_spec, as_placement = llava.place("fna:m=8,tower=text", None), llava.place("fna:m=8", "text")
    assert in_spec.canonical == as_placement.canonical == language.canonical
    with pytest.raises(llava.PlacementError, match="names tower=image"):
        llava.place("fna:m=8,tower=image", "language")
    with pytest.raises(llava.PlacementError, match="fastv runs only in tower=text"):
        llava.place("fastv:tokens=4", "vision")


@pytest.mark.parametrize("placement,towers", [("vision", {"image"}), ("language", {"text"}),
                                              ("both", {"image", "text"})])
def test_exact_and_every_token_a_landmark_reproduce_the_unpatched_model(tiny, placement, towers):
    model, processor, inputs = tiny
    ref = _logits(model, inputs)
    answer = llava.generate(model, processor, inputs, max_new_tokens=4)
    n = inputs["input_ids"].shape[1]
    for spec in ("exact", f"fna:m={n + 1}"):  # m >= N: every token is a landmark
        with fnabench.patch(model, llava.place(spec, placement)) as handle:
            assert set(handle.states) == towers
            assert (_logits(model, inputs) - ref).abs().max() < 1e-5
            assert llava.generate(model, processor, inputs, max_new_tokens=4) == answer
    with fnabench.patch(model, llava.place("fna:m=6", placement)):
        assert (_logits(model, inputs) - ref).abs().max() > 1e-4  # it does approximate
    assert torch.equal(_logits(model, inputs), ref)  # removed


def test_the_language_placement_is_causal_and_guarantees_text_tokens(tiny):
    model, processor, inputs = tiny
    ids = inputs["input_ids"]
    image = ids[0] == model.config.image_token_id
    with fnabench.patch(model, llava.place("fna:m=20,guarantee=text", "language")) as handle:
        out = _logits(model, inputs)
        landmarks = handle.states["text"].landmarks[0]
        assert set(torch.nonzero(~image).flatten().tolist()) <= set(landmarks.tolist())
        later = dict(inputs, input_ids=ids.clone())
        later["input_ids"][0, -3:] = processor.tokenizer.convert_tokens_to_ids("red")
        t = ids.shape[1] - 3
        assert (_logits(model, later)[:, :t] - out[:, :t]).abs().max() < 1e-5
    with fnabench.patch(model.model.language_model, "fna:m=20,guarantee=text"), pytest.raises(
            ValueError, match="patch the whole LLaVA"):
        _logits(model, inputs)


def test_the_landmark_kv_cache_shrinks_the_language_models_cache(tiny):
    model, _, inputs = tiny
    prepared = llava.model_inputs(model, inputs)
    with torch.no_grad():
        full = model(**prepared, use_cache=True).cache
        with fnabench.patch(model, llava.place("fna:m=8", "language")):
            small = model(**prepared, use_cache=True).cache
    assert small.get_seq_length() == full.get_seq_length() == inputs["input_ids"].shape[1]
    assert cache_bytes(small) < cache_bytes(full) / 2


# ---------------------------------------------------------------------------------------------
# the peers: VisionZip-style (vision tower) and FastV-style (language model) token flows


def test_visionzip_keeps_the_dominant_tokens_and_merges_the_rest(tiny):
    from fnabench.variants.visionzip import plan_reduction

    scores = torch.tensor([[9.0, 0.1, 0.9, 0.2, 0.8, 0.3, 0.05, 0.7]])
    keys = torch.tensor([[0.0, 1, 0, 1, 0, -1, 1, 0]])[..., None] * torch.ones(1, 1, 2)
    keys[0, 0] = torch.tensor([0.3, 0.3])
    top, targets, group = plan_reduction(scores, keys, prefix=1, dominant=3, contextual=2)
    assert top.tolist() == [[2, 4, 7]] and targets.tolist() == [[1, 5]]  # the rest: 1, 3, 5, 6
    assert group.tolist() == [[-1, 0, -1, 0, -1, 1, 0, -1]]  # 3 and 6 point the way 1 does

    model, _, inputs = tiny
    ref = _logits(model, inputs)
    with fnabench.patch(model, f"visionzip:tokens={N_IMAGE}"):  # nothing to cut: exact
        assert (_logits(model, inputs) - ref).abs().max() < 1e-5
    with fnabench.patch(model, "visionzip:tokens=6,contextual=2") as handle:
        prepared = llava.model_inputs(model, inputs)
        assert int((prepared["input_ids"] == model.config.image_token_id).sum()) == 6
        assert handle.states["image"].flow.counts == [17, 17, 7]  # reduced after block -2's attention
        with torch.no_grad():
            model(**prepared)


def test_fastv_keeps_the_most_attended_image_tokens_at_their_own_positions(tiny):
    """Blocks after K see the kept tokens at their original rotary positions: the patched model's last-token
    hidden state equals running blocks K+1.. by hand on the kept rows with their own position ids."""
    model, _, inputs = tiny
    lm = model.model.language_model
    prepared = llava.model_inputs(model, inputs)
    ids = prepared["input_ids"]
    k = 1
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(ids)
        feats = model.model.get_image_features(pixel_values=prepared["pixel_values"]).pooler_output[0]
        embeds[ids == model.config.image_token_id] = feats
        with fnabench.patch(model, f"fastv:tokens=5,layers={k}") as handle:
            patched = model(**prepared, output_hidden_states=True)
            flow = handle.states["text"].flow
            kept = flow.kept[0]
            assert flow.counts == [ids.shape[1]] * (k + 1) + [len(kept)] * (TINY.layers - k - 1)
        image = torch.nonzero(ids[0] == model.config.image_token_id).flatten()
        assert int(torch.isin(kept, image).sum()) == 5 and set(torch.nonzero(ids[0] != model.config.image_token_id)
                                                                 .flatten().tolist()) <= set(kept.tolist())
        positions = torch.arange(ids.shape[1])[None]
        x = embeds
        for i, layer in enumerate(lm.layers):  # unpatched now; the patch pruned between block k's attention
            if i == k + 1:  # and its MLP, which works per token: the same as pruning after block k
                x, positions = x[:, kept], positions[:, kept]
            pe = lm.rotary_emb(x, position_ids=positions)
            x = layer(x, attention_mask=None, position_ids=positions, position_embeddings=pe)
        want = lm.norm(x)[:, -1]
        assert (patched.hidden_states[-1][:, -1] - want).abs().max() < 1e-4
        with fnabench.patch(model, f"fastv:tokens={N_IMAGE},layers={k}"):  # keeps every image token: exact
            assert (model(**prepared).logits - _logits(model, inputs)).abs().max() < 1e-5


def test_fastv_shrinks_the_cache_and_counted_flops_fall_with_fewer_tokens(tiny):
    model, processor, inputs = tiny
    prepared = llava.model_inputs(model, inputs)
    flops, sizes = {}, {}
    for spec in ("exact", "fastv:tokens=8,layers=1", "fastv:tokens=2,layers=1", "visionzip:tokens=8",
                 "visionzip:tokens=2,contextual=1"):
        with fnabench.patch(model, spec):
            with torch.no_grad():
                sizes[spec] = cache_bytes(model(**llava.model_inputs(model, inputs), use_cache=True).cache)
            flops[spec] = fnabench.count_flops(lambda: model(**llava.model_inputs(model, inputs))).total
            assert llava.generate(model, processor, inputs, max_new_tokens=3)  # decoding runs on the cut cache
    assert flops["exact"] > flops["fastv:tokens=8,layers=1"] > flops["fastv:tokens=2,layers=1"]
    assert flops["exact"] > flops["visionzip:tokens=8"] > flops["visionzip:tokens=2,contextual=1"]
    assert sizes["exact"] > sizes["fastv:tokens=8,layers=1"] > sizes["fastv:tokens=2,layers=1"]
    assert prepared["input_ids"].shape[1] > 0


def test_token_flows_refuse_the_wrong_kind_of_tower(tiny):
    model, _, _ = tiny
    with pytest.raises(fnabench.adapters.UnsupportedModelError, match="visionzip runs in encoders"):
        fnabench.patch(model.model.language_model, "visionzip:tokens=4")  # a decoder on its own
    with pytest.raises(ValueError, match="fastv prunes image tokens"), fnabench.patch(
            model, "fastv:tokens=4,layers=1"), torch.no_grad():  # the language model called on its own
        model.model.language_model(inputs_embeds=torch.randn(1, 12, TINY.hidden))


def test_qwen2_vl_language_model_takes_causal_variants():
    """Qwen2-VL-style models: the language model dispatches through AttentionInterface, so tower=text works."""
    import transformers as tr

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4],
                                                        "rope_theta": 10000.0})
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2)
    torch.manual_seed(0)
    model = tr.Qwen2VLForConditionalGeneration(tr.Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=60, video_token_id=61, vision_start_token_id=62,
        bos_token_id=1, eos_token_id=2)).eval()
    ids = torch.randint(0, 59, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with fnabench.patch(model, llava.place("exact", "language")) as handle:
            assert len(handle.sites) == 2 and (model(input_ids=ids).logits - ref).abs().max() < 1e-5
        with fnabench.patch(model, llava.place("fna:m=6", "language")):
            out = model(input_ids=ids).logits
            later = ids.clone()
            later[:, 12:] = 3
            assert (model(input_ids=later).logits[:, :12] - out[:, :12]).abs().max() < 1e-5
            assert (out - ref).abs().max() > 1e-4
