"""The host-adapter contract, driven by the declarations in ``fnabench.patching.hosts.HOSTS``: every attention
kind and every block kind an adapter declares is patched on a tiny host that has it, where ``exact`` changes
nothing, a live variant changes the output, FNA with m >= N is exact, and ``remove()`` restores the model bit
for bit. A kind without a tiny host here fails ``test_every_declared_kind_has_a_tiny_host``."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import tiny_open_clip, tiny_timm

import fnabench
from fnabench.patching.hosts import HOSTS

transformers = pytest.importorskip("transformers")


def _hf_clip():
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=2, image_size=32, patch_size=8)
    model = transformers.CLIPVisionModel(cfg).eval()
    return model, torch.randn(2, 3, 32, 32), lambda m, x: m(x).last_hidden_state


def _hf_gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    return model, torch.randint(0, 50, (1, 40)), lambda m, x: m(x).logits


def _hf_llama():
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model, torch.randint(0, 50, (1, 40)), lambda m, x: m(x).logits


def _timm():
    return tiny_timm(), torch.randn(2, 3, 32, 32), lambda m, x: m(x)


def _open_clip(block_type):
    def make():
        return tiny_open_clip(block_type=block_type), torch.randn(2, 3, 32, 32), lambda m, x: m.encode_image(x)
    return make


def _mmseg_vit():
    if importlib.util.find_spec("mmseg") is None or importlib.util.find_spec("mmcv") is None:
        pytest.skip("the seg extra (mmseg, mmcv from tools/install_mmcv.sh) is not installed")
    from mmseg.models.backbones import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dims=32, num_layers=2, num_heads=2, out_indices=(1,))
    model.eval()  # some mmseg modules' train() returns None: never chain it
    return model, torch.randn(2, 3, 32, 32), lambda m, x: m(x)[0]


def _mmseg_beit():
    if importlib.util.find_spec("mmseg") is None or importlib.util.find_spec("mmcv") is None:
        pytest.skip("the seg extra (mmseg, mmcv from tools/install_mmcv.sh) is not installed")
    from mmseg.models.backbones import BEiT

    model = BEiT(img_size=32, patch_size=8, embed_dims=32, num_layers=2, num_heads=2, out_indices=(1,))
    model.eval()
    return model, torch.randn(2, 3, 32, 32), lambda m, x: m(x)[0]


def _timm_named(name: str, **kwargs):
    def make():
        timm = pytest.importorskip("timm")
        model = timm.create_model(name, pretrained=False, num_classes=0, img_size=32, patch_size=8, depth=2,
                                  embed_dim=32, num_heads=2, **kwargs).eval()
        return model, torch.randn(2, 3, 32, 32), lambda m, x: m.forward_features(x)  # every token
    return make


#: attention-kind label → a tiny host that has it: (model, input, output function)
ATTENTION_HOSTS = {
    "open_clip.transformer.Attention": _open_clip("custom"),
    "timm.layers.Attention": _timm,
    "timm.layers.AttentionRope": _timm_named("vit_pe_core_tiny_patch16_384", init_values=1.0),
    "timm.models.eva.EvaAttention": _timm_named("eva02_tiny_patch14_224"),
    "timm.models.beit.Attention": _timm_named("beit_base_patch16_224"),
    "timm.models.vision_transformer_relpos.RelPosAttention": _timm_named("vit_relpos_base_patch16_224",
                                                                         init_values=1.0),
    "transformers attention": _hf_clip,
    "transformers decoder attention": _hf_llama,
    "mmseg BEiTAttention": _mmseg_beit,
    "torch.nn.MultiheadAttention": _open_clip(None),
}
#: block-kind label → a tiny host whose blocks run token flows
BLOCK_HOSTS = {
    "open_clip.transformer.ResidualAttentionBlock": _open_clip(None),
    "timm.models.vision_transformer.Block": _timm,
    "transformers encoder layer": _hf_clip,
    "transformers decoder layer": _hf_llama,
    "mmseg vit.TransformerEncoderLayer": _mmseg_vit,
}
#: attention with an additive bias (BEiT's relative positions): approximations refuse it by name, exact runs it
BIASED_KINDS = {"mmseg BEiTAttention", "timm.models.beit.Attention",
                "timm.models.vision_transformer_relpos.RelPosAttention"}
#: a decoder kind runs causally; the flow it takes is FastV-style (it needs image tokens: tested in test_llava)
CAUSAL_KINDS = {"transformers decoder attention", "transformers decoder layer"}


def _declared(attr: str) -> list[tuple[str, str]]:
    """(host, kind label) for every kind the adapters declare, for hosts whose library is installed."""
    out = []
    for adapter in HOSTS:
        if adapter.host != "torch" and importlib.util.find_spec(adapter.host) is None:
            continue
        make = getattr(adapter, attr)
        try:
            kinds = make() if make is not None else []
        except ImportError:  # the host library imports, but a part it needs does not (mmseg without mmcv)
            continue
        out.extend((adapter.host, kind.label) for kind in kinds)
    return out


def test_every_declared_kind_has_a_tiny_host():
    assert {label for _, label in _declared("kinds")} <= set(ATTENTION_HOSTS)
    assert {label for _, label in _declared("block_kinds")} <= set(BLOCK_HOSTS)
    assert all(adapter.looks_for for adapter in HOSTS)


@pytest.mark.parametrize("host, label", _declared("kinds"), ids=lambda v: str(v))
def test_attention_kind_contract(host, label):
    model, x, out = ATTENTION_HOSTS[label]()
    keys = list(model.state_dict())
    n = 40 if label in CAUSAL_KINDS else 64
    with torch.no_grad():
        before = out(model, x)
        with fnabench.patch(model, "exact") as handle:
            assert any(site.kind.label == label for site in handle.sites), f"{label}: no site of this kind"
            assert (out(model, x) - before).abs().max().item() <= 1e-5
        if label in BIASED_KINDS:
            with fnabench.patch(model, f"fna:m={n}"), pytest.raises(ValueError, match="cannot honour an attention"):
                out(model, x)
        else:
            with fnabench.patch(model, f"fna:m={n}"):  # m >= N: FNA is exact attention
                assert (out(model, x) - before).abs().max().item() <= 1e-4
        live = "mask:tokens=first,action=values" if label in BIASED_KINDS else "null:layers=-1:"
        with fnabench.patch(model, live):
            assert (out(model, x) - before).abs().max().item() > 1e-4, f"{label}: the patch is not live"
        assert list(model.state_dict()) == keys
        assert torch.equal(out(model, x), before)


@pytest.mark.parametrize("host, label", [d for d in _declared("block_kinds") if d[1] not in CAUSAL_KINDS],
                         ids=lambda v: str(v))
def test_block_kind_contract(host, label):
    model, x, out = BLOCK_HOSTS[label]()
    with torch.no_grad():
        before = out(model, x)
        with fnabench.patch(model, "tome:r=2,layers=0:") as handle:
            assert handle.sites
            merged = out(model, x)
        assert merged.shape == before.shape  # the tower gives every input position a token again
        assert torch.equal(out(model, x), before)
