"""Patching host models: exact reproduces the original, removal restores it, errors are clear."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, tiny_open_clip, tiny_timm
from torch import nn

import fnabench
from fnabench.adapters import AlreadyPatchedError, UnsupportedModelError

transformers = pytest.importorskip("transformers")


def _hf_clip():
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=2, image_size=32, patch_size=8)
    return transformers.CLIPVisionModel(cfg).eval()


def _hf_siglip():
    cfg = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=2, image_size=32, patch_size=8)
    return transformers.SiglipVisionModel(cfg).eval()


def _hf_dinov2():
    cfg = transformers.Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=2, image_size=32, patch_size=8)
    return transformers.Dinov2Model(cfg).eval()


def _timm_dinov2(reg: bool = False):
    timm = pytest.importorskip("timm")
    name = "vit_small_patch14_reg4_dinov2" if reg else "vit_small_patch14_dinov2"
    return timm.create_model(name, pretrained=False, img_size=28, depth=3, num_classes=0).eval()


def _out(model, x):
    if hasattr(model, "encode_image"):
        return model.encode_image(x)
    out = model(x)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


MODELS = {
    "open_clip-mha": lambda: tiny_open_clip(),
    "open_clip-custom": lambda: tiny_open_clip(block_type="custom"),
    "timm-fused": lambda: tiny_timm(fused=True),
    "timm-unfused": lambda: tiny_timm(fused=False),
    "timm-dinov2": lambda: _timm_dinov2(),
    "timm-dinov2-reg": lambda: _timm_dinov2(reg=True),
    "hf-clip": _hf_clip,
    "hf-siglip": _hf_siglip,
    "hf-dinov2": _hf_dinov2,
}
SIZE = {"timm-dinov2": 28, "timm-dinov2-reg": 28}


@pytest.fixture(params=sorted(MODELS))
def model_and_input(request):
    model = MODELS[request.param]()
    size = SIZE.get(request.param, 32)
    return request.param, model, torch.randn(2, 3, size, size)


def test_exact_reproduces_unpatched_and_remove_restores(model_and_input):
    name, model, x = model_and_input
    keys = list(model.state_dict())
    with torch.no_grad():
        before = _out(model, x)
        handle = fnabench.patch(model, "exact")
        assert handle.sites, name
        patched = _out(model, x)
        assert list(model.state_dict()) == keys
        handle.remove()
        after = _out(model, x)
    assert (patched - before).abs().max().item() <= 1e-5, name
    assert torch.equal(after, before), name
    for site in handle.sites:
        assert "forward" not in site.module.__dict__
        assert "_fnabench_site" not in site.module.__dict__


def test_patch_is_live_and_context_manager_restores(model_and_input):
    name, model, x = model_and_input
    with torch.no_grad():
        before = _out(model, x)
        with fnabench.patch(model, "null:layers=-1:"):
            changed = _out(model, x)
        after = _out(model, x)
    assert (changed - before).abs().max().item() > 1e-4, f"{name}: patch did not change the output"
    assert torch.equal(after, before)


def test_double_patch_raises():
    model = tiny_timm()
    handle = fnabench.patch(model, "fna:m=4")
    with pytest.raises(AlreadyPatchedError, match="already patched"):
        fnabench.patch(model, "exact")
    handle.remove()
    fnabench.patch(model, "exact").remove()  # fine once removed


@pytest.mark.parametrize("spec, selects", [("fna:m=4,layers=50", False), ("fna:m=4,layers=-4", False),
                                            ("mask:layers=3:", False), ("fna:m=4+mask:layers=7", False),
                                            ("fna:m=4,layers=2:50", True), ("fna:m=4,layers=-3", True)])
def test_layers_that_select_no_block_are_refused_not_a_silent_no_op(spec, selects):
    model = tiny_timm()  # 3 blocks
    if selects:
        fnabench.patch(model, spec).remove()
        return
    with pytest.raises(fnabench.SpecError, match=r"selects no block \(image tower: 3 blocks\); accepted: indices 0..2"):
        fnabench.patch(model, spec)
    assert not any("_fnabench_site" in m.__dict__ for m in model.modules())
    fnabench.patch(model, "exact").remove()  # nothing was left half-patched


def test_unsupported_model_names_classes():
    with pytest.raises(UnsupportedModelError) as err:
        fnabench.patch(nn.Sequential(nn.Linear(4, 4)), "fna")
    msg = str(err.value)
    assert "\n" not in msg
    for cls in ("nn.MultiheadAttention", "timm.layers.Attention", "open_clip.transformer.Attention"):
        assert cls in msg


def test_transformers_interface_and_swap_routes_agree(monkeypatch):
    import fnabench.patching.transformers as hf

    model = _hf_clip()
    x = torch.randn(2, 3, 32, 32)
    spec = "fna:m=6,layers=-2:"
    config = model.config
    original_impl = config._attn_implementation
    with torch.no_grad(), fnabench.patch(model, spec):
        assert config._attn_implementation == hf.IMPLEMENTATION
        via_interface = _out(model, x)
    assert config._attn_implementation == original_impl
    monkeypatch.setattr(hf, "ROUTE", "swap")
    with torch.no_grad(), fnabench.patch(model, spec) as handle:
        assert all("forward" in s.module.__dict__ for s in handle.sites)
        via_swap = _out(model, x)
    assert torch.allclose(via_interface, via_swap, atol=1e-5)


def test_open_clip_text_tower_only_when_asked():
    model = tiny_open_clip()
    text = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        ref = model.encode_text(text)
        with fnabench.patch(model, "null") as handle:
            assert {s.state.tower for s in handle.sites} == {"image"}
            assert torch.equal(model.encode_text(text), ref)
        with fnabench.patch(model, "mask:tower=text,artifact_ratio=1.01,massive_ratio=50") as handle:
            assert {s.state.tower for s in handle.sites} == {"text"}
            masked = model.encode_text(text)
        with fnabench.patch(model, "exact:impl=math+mask:tower=text,artifact_ratio=1e9,massive_ratio=2e9"):
            same = model.encode_text(text)
    assert torch.isfinite(masked).all()
    assert (masked - ref).abs().max() > 1e-5
    assert (same - ref).abs().max() <= 1e-5


def test_fna_runs_the_causal_text_tower_causally():
    model = tiny_open_clip()  # its text tower's additive causal mask is recognised, not refused
    text = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        exact = model.encode_text(text)
        with fnabench.patch(model, "fna:m=4,tower=text"):
            approx = model.encode_text(text)
        with fnabench.patch(model, "fna:m=16,tower=text"):  # m >= N: exact attention
            torch.testing.assert_close(model.encode_text(text), exact, rtol=0, atol=1e-5)
    assert (approx - exact).abs().max() > 1e-4


def test_prefix_tokens_detected():
    cases = {"timm-dinov2-reg": 5, "timm-fused": 1, "hf-siglip": 0, "hf-dinov2": 1, "open_clip-mha": 1,
             "hf-clip": 1}
    for name, expected in cases.items():
        handle = fnabench.patch(MODELS[name](), "exact")
        assert handle.states["image"].num_prefix == expected, name
        handle.remove()


def test_fna_error_falls_with_m_on_patched_model():
    model = tiny_timm(img_size=64)  # 8x8 patches + CLS = 65 tokens
    with torch.no_grad():  # random init attends almost uniformly; sharpen it so m matters
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.forward_features(x)
        errors = []
        for m in (4, 16, 48, 65):
            with fnabench.patch(model, f"fna:m={m}"):
                errors.append(rel_err(model.forward_features(x), ref))
    assert errors[0] > errors[1] > errors[2] > 0.001, errors
    assert errors[3] < 1e-5, errors  # m >= N is exact


def test_landmarks_chosen_once_and_shared_across_layers():
    model = tiny_timm(img_size=64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), fnabench.patch(model, "fna:m=8,layers=1:") as handle:
        calls = []
        import fnabench.variants.variant as vv

        original = vv.lm.farthest_point_sampling

        def spy(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        vv.lm.farthest_point_sampling = spy
        try:
            model(x)
            model(x)
        finally:
            vv.lm.farthest_point_sampling = original
        landmarks = handle.states["image"].landmarks
    assert len(calls) == 2  # once per forward, at the first FNA layer (layer 1), not per layer
    assert landmarks.shape == (2, 8) and landmarks.dtype == torch.int64
    assert (landmarks[:, 0] == 0).all()  # CLS guaranteed first


def _plant_sinks(model, tokens=(5, 17, 40), factor=12.0, after_block=0, dims=(3, 77)):
    """Massive activations planted like real ones: huge values in a few fixed channels of chosen tokens
    of the residual stream after one block (a uniform scale would vanish in the next LayerNorm)."""

    def hook(_module, _args, output):
        output = output.clone()
        scale = factor * output.abs().mean()
        for d in dims:
            output[:, list(tokens), d] += scale * 10
        return output

    return model.blocks[after_block].register_forward_hook(hook)


def test_planted_outliers_become_landmarks_on_a_patched_model():
    """fps (on the residual stream) and norm force planted massive tokens into the landmark set; random
    does not. The error ordering fps/norm < random is tested where it holds by construction, on planted
    q/k/v (test_variants.py); in a pre-LN model, planted residual outliers do not carry large values."""
    model = tiny_timm(img_size=64)  # 65 tokens
    hook = _plant_sinks(model)
    x = torch.randn(2, 3, 64, 64)
    chosen = {}
    with torch.no_grad():
        ref = model.forward_features(x)
        for sel in ("fps", "norm", "random"):
            with fnabench.patch(model, f"fna:m=12,layers=1:,landmarks={sel},features=input") as handle:
                assert rel_err(model.forward_features(x), ref) < 0.5
                chosen[sel] = [set(row.tolist()) for row in handle.states["image"].landmarks]
    hook.remove()
    for sel in ("fps", "norm"):
        assert all({5, 17, 40} <= row for row in chosen[sel]), sel
    assert not all({5, 17, 40} <= row for row in chosen["random"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_patched_model_in_half_precision_stays_finite(dtype):
    model = tiny_timm(img_size=64).to(dtype)
    hook = _plant_sinks(model, factor=40.0)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    with torch.no_grad(), fnabench.patch(model, "fna:m=8,layers=1:+mask:tokens=all"):
        out = model.forward_features(x)
    hook.remove()
    assert torch.isfinite(out).all()
