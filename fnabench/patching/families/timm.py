"""timm architectures in the family contract (``fnabench.patching.families``): each built by
``timm.create_model(name, pretrained=False, ...)`` shrunk to a few blocks, 32-64 px and a small width."""

from __future__ import annotations

from collections.abc import Callable

from fnabench.patching.families.family import Family

#: a plain ViT's shrink: 4x4 patches of 8 px (+ prefix tokens), two blocks of width 32
_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def _timm(name: str, size: int = 32, **kwargs) -> Callable:
    """make(): the tiny random ``name`` in eval mode, a [2, 3, size, size] image batch, and its pooled features."""

    def make():
        import timm
        import torch

        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
        return model, torch.randn(2, 3, size, size), lambda m, x: m(x)

    return make


FAMILIES: tuple[Family, ...] = (
    Family("vit_tiny_patch16_224", "timm", "encoder", _timm("vit_tiny_patch16_224", **_VIT), "forward",
           note="timm.layers.Attention"),
    Family("deit_tiny_distilled_patch16_224", "timm", "encoder",
           _timm("deit_tiny_distilled_patch16_224", **_VIT), "forward", note="two prefix tokens (CLS, distillation)"),
    Family("vit_small_patch14_reg4_dinov2", "timm", "encoder",
           _timm("vit_small_patch14_reg4_dinov2", **_VIT, init_values=1.0), "forward",
           note="four registers, LayerScale"),
    Family("vit_base_patch16_siglip_224", "timm", "encoder", _timm("vit_base_patch16_siglip_224", **_VIT),
           "forward", note="its AttentionPoolLatent head (latent queries over the tokens) runs exact"),
    Family("vit_small_patch16_18x2_224", "timm", "encoder",
           _timm("vit_small_patch16_18x2_224", **_VIT, init_values=1.0), "forward",
           note="ParallelThingsBlock: two attentions per block"),
    Family("vit_tiny_r_s16_p8_224", "timm", "encoder",
           _timm("vit_tiny_r_s16_p8_224", size=64, img_size=64, depth=2, embed_dim=32, num_heads=2), "forward",
           note="hybrid: ResNet stem, then ViT blocks"),
    Family("naflexvit_base_patch16_gap", "timm", "encoder",
           _timm("naflexvit_base_patch16_gap", **_VIT, init_values=1.0), "forward",
           note="NaFlexViT on a fixed-size image batch (no padding mask)"),
    Family("eva02_tiny_patch14_224", "timm", "encoder", _timm("eva02_tiny_patch14_224", **_VIT), "forward",
           note="EvaAttention: rotary q/k, q/v-only bias, SwiGLU"),
    Family("vit_medium_patch16_rope_reg1_gap_256", "timm", "encoder",
           _timm("vit_medium_patch16_rope_reg1_gap_256", **_VIT, init_values=1.0), "forward",
           note="EvaAttention with rotary q/k after a register"),
    Family("vit_pe_core_tiny_patch16_384", "timm", "encoder",
           _timm("vit_pe_core_tiny_patch16_384", **_VIT, init_values=1.0), "forward",
           note="AttentionRope (Perception Encoder); its attention-pool head runs exact"),
    Family("beit_base_patch16_224", "timm", "encoder", _timm("beit_base_patch16_224", **_VIT), "refused",
           refused="relative position bias",
           note="exact attention runs it; approximations refuse at the first forward"),
    Family("vit_relpos_base_patch16_224", "timm", "encoder", _timm("vit_relpos_base_patch16_224", **_VIT),
           "refused", refused="relative position bias",
           note="exact attention runs it; approximations refuse at the first forward"),
    Family("swin_tiny_patch4_window7_224", "timm", "encoder",
           _timm("swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=4, depths=(1, 1),
                 num_heads=(2, 2), embed_dim=16), "refused", refused="window attention"),
    Family("xcit_nano_12_p16_224", "timm", "encoder", _timm("xcit_nano_12_p16_224", **_VIT), "refused",
           refused="cross-covariance attention"),
    Family("cait_xxs24_224", "timm", "encoder", _timm("cait_xxs24_224", **_VIT), "refused",
           refused="talking-heads attention"),
    Family("levit_128s", "timm", "encoder",
           _timm("levit_128s", img_size=32, embed_dim=(32, 48), key_dim=8, depth=(1, 1), num_heads=(2, 2)),
           "refused", refused="attention bias per token pair"),
    Family("pvt_v2_b0", "timm", "encoder",
           _timm("pvt_v2_b0", depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), num_heads=(1, 1, 1, 1)),
           "refused", refused="spatial-reduction attention"),
    Family("maxvit_pico_rw_256", "timm", "encoder",
           _timm("maxvit_pico_rw_256", size=64, img_size=64, embed_dim=(16, 32), depths=(1, 1), stem_width=(8, 16),
                 transformer_dim_head=8, block_type=("M", "M")), "refused", refused="partition attention"),
    Family("vit_pwee_patch16_reg1_gap_256", "timm", "encoder", _timm("vit_pwee_patch16_reg1_gap_256", **_VIT),
           "refused", refused="attention fused into a parallel block"),
)
