"""Shared fixtures: offline switches, seeds, and tiny random-initialised host models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

#: the smallest real sweep: a random-init timm ViT, synthetic images, exact, FNA and Nystrom
TINY_SWEEP = """
name = "tiny"
models = ["tiny:vit"]
image_sizes = [32]
tasks = ["fidelity:synthetic"]
variants = ["fna:m=4,layers=-2:", "exact", "nystrom:m=4"]
limit = 4
batch_size = 2
timing_repeats = 1
"""


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` against reference ``b``; NaN/inf never pass."""
    assert torch.isfinite(a).all(), "non-finite values in approximation"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_open_clip(block_type: str | None = None, image_size: int = 32):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=3, width=64, head_width=16, patch_size=8, image_size=image_size,
                           block_type=block_type)
    text = CLIPTextCfg(context_length=16, vocab_size=64, width=32, heads=2, layers=2, block_type=block_type)
    return open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text).eval()


def tiny_timm(fused: bool = True, img_size: int = 32, **kwargs):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=8,
                              depth=3, num_classes=0, **kwargs).eval()
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    return model


def perturbed_after(xs, t, seed=1):
    """Copies of [B, H, N, d] tensors with every position after ``t`` changed (causality checks)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in xs:
        y = x.clone()
        y[:, :, t + 1:] += 3 * torch.randn(y[:, :, t + 1:].shape, generator=gen, dtype=y.dtype)
        out.append(y)
    return out
