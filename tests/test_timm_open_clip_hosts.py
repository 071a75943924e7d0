"""timm's and open_clip's attention as fnabench patches it: every served class reproduces the host's own output
(rotary EVA/RoPE attention in each projection layout, ``is_causal``, relative position biases under exact), the
classes fnabench cannot serve are refused in one line by name before any output, and open_clip's causal text
tower runs the variant causally while any other mask is refused by what it is."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_open_clip
from torch import nn

import fnabench
from fnabench._errors import UserError
from fnabench.patching.torch_mha import AttentionMaskRefused, UnservableAttentionError, is_causal_mask

timm = pytest.importorskip("timm")

_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 0}


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _tokens(model, x):
    return model.forward_features(x)


def _check_served(model, x, out=_tokens) -> None:
    """exact and FNA with m >= N give the host's output; FNA at m=4 changes it; remove() restores it."""
    with torch.no_grad():
        before = out(model, x)
        for spec in ("exact", "fna:m=512"):
            with fnabench.patch(model, spec):
                assert _diff(out(model, x), before) <= 1e-5, spec
        with fnabench.patch(model, "fna:m=4"):
            assert _diff(out(model, x), before) > 1e-4, "the patch is not live"
        assert torch.equal(out(model, x), before)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name, kwargs", [
    ("eva02_tiny_patch14_224", {}),  # separate q/k/v projections (EVA-02), rotary on the non-prefix tokens
    ("eva02_tiny_patch14_224", {"qkv_fused": True}),  # fused qkv with EVA's q/v-only bias
    ("vit_medium_patch16_rope_reg1_gap_256", {"init_values": 1.0}),
    ("vit_pe_core_tiny_patch16_384", {"init_values": 1.0}),  # AttentionRope, fused qkv
    ("vit_pe_core_tiny_patch16_384", {"init_values": 1.0, "qkv_fused": False, "num_heads": 4, "num_kv_heads": 2}),
])
def test_rotary_attention_reproduces_timm(name, kwargs, fused):
    model = timm.create_model(name, pretrained=False, **{**_VIT, **kwargs}).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    with fnabench.patch(model, "exact") as handle:
        labels = {site.kind.label for site in handle.sites}
    assert labels <= {"timm.layers.AttentionRope", "timm.models.eva.EvaAttention"} and labels
    _check_served(model, torch.randn(2, 3, 32, 32))


def _causal_stack(n_heads: int = 2, width: int = 32) -> nn.Module:
    """Two timm ``Attention`` modules in a block list, called with ``is_causal=True``."""

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(timm.layers.Attention(width, num_heads=n_heads) for _ in range(2))

        def forward(self, x):
            for blk in self.blocks:
                x = x + blk(x, is_causal=True)
            return x

    return Stack().eval()


def test_timm_is_causal_runs_the_variant_causally():
    model, x = _causal_stack(), torch.randn(2, 24, 32)
    _check_served(model, x, out=lambda m, x: m(x))
    y = x.clone()
    y[:, 18:] += 3 * torch.randn_like(y[:, 18:])
    with torch.no_grad(), fnabench.patch(model, "fna:m=4"):
        assert torch.equal(model(x)[:, :18], model(y)[:, :18]), "a later token changed an earlier output"


def _with_random_bias(model):
    """A trained BEiT's relative position bias is not zero (timm initialises it to zeros)."""
    for m in model.modules():
        table = getattr(m, "relative_position_bias_table", None)
        if isinstance(table, nn.Parameter):
            nn.init.normal_(table, std=0.5)
    return model


@pytest.mark.parametrize("name", ["beit_base_patch16_224", "vit_relpos_base_patch16_224"])
def test_relative_position_bias_runs_exact_and_refuses_approximations(name):
    model = _with_random_bias(timm.create_model(name, pretrained=False, **_VIT).eval())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        with fnabench.patch(model, "exact"):
            assert _diff(model(x), before) <= 1e-5
        with fnabench.patch(model, "fna:m=512"), pytest.raises(AttentionMaskRefused) as err:
            model(x)
        assert torch.equal(model(x), before)
    message = str(err.value)
    assert "relative position bias" in message and "\n" not in message
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize("name, kwargs, lacks", [
    ("swin_tiny_patch4_window7_224", {"img_size": 32, "patch_size": 4, "window_size": 4, "depths": (1, 1),
                                      "num_heads": (2, 2), "embed_dim": 16},
     "swin_transformer.WindowAttention: window"),
    ("xcit_nano_12_p16_224", _VIT, "xcit.XCA: cross-covariance attention"),
    ("pvt_v2_b0", {"depths": (1, 1, 1, 1), "embed_dims": (8, 16, 24, 32), "num_heads": (1, 1, 1, 1)},
     "pvt_v2.Attention: spatial-reduction attention"),
])
def test_unservable_timm_classes_are_refused_by_name_at_patch_time(name, kwargs, lacks):
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    keys = list(model.state_dict())
    for spec in ("exact", "fna:m=4"):  # even exact: fnabench cannot reproduce this class's forward
        with pytest.raises(UnservableAttentionError) as err:
            fnabench.patch(model, spec)
        message = str(err.value)
        assert lacks in message and "\n" not in message and "fnabench patches timm.layers.Attention" in message
    assert not any("_fnabench_site" in m.__dict__ or "forward" in m.__dict__ for m in model.modules())
    assert list(model.state_dict()) == keys


def test_a_subclass_with_its_own_forward_is_refused_and_one_without_is_patched():
    class Plain(timm.layers.Attention):
        pass

    class Own(timm.layers.Attention):
        def forward(self, x, attn_mask=None, is_causal=False):
            return super().forward(x) * 2

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **_VIT).eval()
    model.blocks[0].attn.__class__ = Plain
    _check_served(model, torch.randn(2, 3, 32, 32))
    model.blocks[1].attn.__class__ = Own
    with pytest.raises(UnservableAttentionError, match=r"\.Own: it subclasses timm\.layers\.Attention with a forward"):
        fnabench.patch(model, "exact")


def test_attention_pooling_head_runs_exact_as_timm_wrote_it():
    model = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, **_VIT).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), fnabench.patch(model, "null") as handle:  # every listed site's attention is nulled
        assert all(site.module is not model.attn_pool for site in handle.sites)
        assert "forward" not in model.attn_pool.__dict__
        tokens = model.forward_features(x)
        assert torch.equal(model.forward_head(tokens), model.attn_pool(tokens))  # the head is timm's own


# --------------------------------------------------------------------------------------------- open_clip


def _text_tokens(model, text):
    """open_clip CLIP's text tower, per token ([B, N, C]: the leak check compares positions)."""
    x = model.token_embedding(text) + model.positional_embedding
    return model.ln_final(model.transformer(x, attn_mask=model.attn_mask))


@pytest.mark.parametrize("block_type", [None, "custom"])
@pytest.mark.parametrize("tower", ["text", "all"])
def test_open_clip_text_tower_runs_causally(block_type, tower):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32, block_type=block_type)
    text = CLIPTextCfg(context_length=24, vocab_size=64, width=32, heads=2, layers=2, block_type=block_type)
    model = open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text).eval()
    ids = torch.randint(0, 64, (2, 24))
    later = ids.clone()
    later[:, 18:] = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        before = _text_tokens(model, ids)
        with fnabench.patch(model, f"fna:m=512,tower={tower}") as handle:
            assert "text" in {site.state.tower for site in handle.sites}
            assert _diff(_text_tokens(model, ids), before) <= 1e-5
        with fnabench.patch(model, f"fna:m=4,tower={tower}"):
            live = _text_tokens(model, ids)
            assert _diff(live, before) > 1e-4
            assert torch.equal(_text_tokens(model, later)[:, :18], live[:, :18]), "the text tower leaked the future"
            model.encode_text(ids)  # the pooled embedding runs too
        assert torch.equal(_text_tokens(model, ids), before)


@pytest.mark.parametrize("block_type", [None, "custom"])
def test_open_clip_other_masks_run_exact_and_are_refused_by_what_they_are(block_type):
    model = tiny_open_clip(block_type=block_type)
    x = torch.randn(2, 16, 32)
    causal = model.attn_mask
    padded = causal.clone()
    padded[:, 12:] = float("-inf")  # the last four keys dropped for every query: causal plus padding
    random_bias = torch.randn(16, 16)
    with torch.no_grad():
        for mask, words in ((padded, "also drops earlier keys (padding)"), (random_bias, "an additive bias")):
            before = model.transformer(x, attn_mask=mask)
            with fnabench.patch(model, "exact:tower=text"):
                assert _diff(model.transformer(x, attn_mask=mask), before) <= 1e-5
            with fnabench.patch(model, "fna:m=4,tower=text"), pytest.raises(AttentionMaskRefused) as err:
                model.transformer(x, attn_mask=mask)
            assert words in str(err.value) and "attn_mask" in str(err.value) and "\n" not in str(err.value)


def test_open_clip_attention_subclass_with_its_own_forward_is_refused():
    from open_clip.transformer import Attention

    class Own(Attention):
        def forward(self, x, attn_mask=None):
            return super().forward(x, attn_mask=attn_mask)

    model = tiny_open_clip(block_type="custom")
    model.visual.transformer.resblocks[0].attn.__class__ = Own
    with pytest.raises(UnservableAttentionError, match=r"subclasses open_clip\.transformer\.Attention"):
        fnabench.patch(model, "exact")


def test_multihead_attention_subclass_with_its_own_forward_is_refused():
    class Own(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = nn.Sequential(Own(8, 2, batch_first=True))
    with pytest.raises(UnservableAttentionError, match=r"subclasses torch\.nn\.MultiheadAttention"):
        fnabench.patch(model, "exact")


def test_causal_mask_recognition():
    n = 6
    additive = torch.full((n, n), float("-inf")).triu(1)
    assert is_causal_mask(additive, n)
    assert is_causal_mask(additive.expand(4, n, n), n)  # (B·H, N, N), as open_clip repeats it
    assert is_causal_mask(torch.full((n, n), torch.finfo(torch.float16).min).triu(1).half(), n)
    assert not is_causal_mask(torch.zeros(n, n), n)
    assert not is_causal_mask(additive[:-1, :-1], n)
    padded = additive.clone()
    padded[:, -1] = float("-inf")
    assert not is_causal_mask(padded, n)
    assert not is_causal_mask(torch.ones(n, n, dtype=torch.bool).triu(1), n)  # bool: callers make it additive
