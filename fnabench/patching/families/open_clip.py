"""open_clip towers in the family contract (``fnabench.patching.families``): the image tower of a tiny
``open_clip.CLIP`` and a standalone causal text tower (``TextTransformer``), each with open_clip's default
``nn.MultiheadAttention`` blocks and with ``block_type="custom"`` (``open_clip.transformer.Attention``)."""

from __future__ import annotations

from collections.abc import Callable

from fnabench.patching.families.family import Family

#: text towers: 24 positions (the contract perturbs those after 17), a 64-token vocabulary
_CONTEXT, _VOCAB = 24, 64


def _image(block_type: str | None) -> Callable:
    """make(): a tiny CLIP, a [2, 3, 32, 32] image batch and its image embedding (the image tower is the default)."""

    def make():
        import open_clip
        import torch
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg

        vision = CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32, block_type=block_type)
        text = CLIPTextCfg(context_length=_CONTEXT, vocab_size=_VOCAB, width=32, heads=2, layers=2,
                           block_type=block_type)
        model = open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text).eval()
        return model, torch.randn(2, 3, 32, 32), lambda m, x: m.encode_image(x)

    return make


def _text(block_type: str | None, **kwargs) -> Callable:
    """make(): a tiny causal text tower alone, [2, 24] token ids, and its per-token features [B, N, C] (what the
    contract's leak check compares position by position)."""

    def make():
        import torch
        from open_clip.transformer import TextTransformer

        model = TextTransformer(context_length=_CONTEXT, vocab_size=_VOCAB, width=32, heads=2, layers=2,
                                output_dim=24, output_tokens=True, block_type=block_type, **kwargs).eval()
        tokens = torch.randint(1, _VOCAB, (2, _CONTEXT), generator=torch.Generator().manual_seed(0))
        tokens[:, -4:] = 0  # padding at the end (pad_id 0): what CoCa's mask drops
        return model, tokens, lambda m, x: m(x)[1]

    return make


FAMILIES: tuple[Family, ...] = (
    Family("image-mha", "open_clip", "encoder", _image(None), "forward",
           note="ViT image tower, nn.MultiheadAttention blocks (open_clip <= 3.3's default)"),
    Family("image-custom", "open_clip", "encoder", _image("custom"), "forward",
           note="ViT image tower, open_clip.transformer.Attention blocks"),
    Family("text-mha", "open_clip", "causal encoder", _text(None), "forward",
           note="causal text tower: its -inf causal mask runs the variant causally"),
    Family("text-custom", "open_clip", "causal encoder", _text("custom"), "forward",
           note="causal text tower, open_clip.transformer.Attention blocks"),
    Family("text-coca", "open_clip", "causal encoder", _text(None, embed_cls=True, correct_cls_mask=True), "refused",
           refused="also drops earlier keys (padding)",
           note="CoCa's appended CLS adds key padding to the causal mask: exact attention runs it"),
)
