"""mmsegmentation 1.x backbones: their attention and blocks, for :func:`fnabench.patch`.

- mmseg's ``VisionTransformer`` builds each layer's attention as mmcv's ``MultiheadAttention``, which wraps
  ``torch.nn.MultiheadAttention`` (at ``layer.attn.attn``) and hands it the tokens sequence-first; the
  ``torch_mha`` adapter patches that inner module (it reads ``batch_first``), so mmcv's wrapper keeps its
  residual, dropout and drop-path. Nothing here is needed for that.
- BEiT's and MAE's ``BEiTAttention`` (own ``qkv`` with q/v biases, a relative position bias) is patched
  here: the bias goes to the variant as an additive mask, which exact attention honours and an
  approximation refuses in one line (FNA cannot take a per-pair bias).
- Token flows (ToMe) patch mmseg's ``TransformerEncoderLayer`` at block level, and a ``VisionTransformer``
  whose ``out_indices`` tap intermediate layers gets a forward that restores each tapped layer's tokens to
  the full grid before reshaping it (BEiT/MAE layers are not offered: their position bias is per token pair).

This module imports mmseg only inside functions: core consults it only when mmseg is already imported.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fnabench.patching.sites import (
    AttentionKind,
    BlockKind,
    BlockSite,
    HostAdapter,
    Site,
    install_forward,
    merge_heads,
    restore_tokens,
)

LOOKS_FOR = ["mmcv.cnn.bricks.transformer.MultiheadAttention (its inner torch MHA)",
             "mmseg BEiTAttention/MAEAttention"]
BLOCKS = ["mmseg vit.TransformerEncoderLayer"]


def _install_beit(site: Site):
    attn = site.module

    def forward(x):
        b, n, _ = x.shape
        if attn.bias == "qv_bias":
            bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
            qkv = F.linear(x, attn.qkv.weight, bias)
        else:
            qkv = attn.qkv(x)
        q, k, v = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        mask = None
        if attn.relative_position_bias_table is not None:
            wh, ww = attn.window_size
            table = attn.relative_position_bias_table[attn.relative_position_index.view(-1)]
            mask = table.view(wh * ww + 1, wh * ww + 1, -1).permute(2, 0, 1)[None].to(q.dtype)
        out = site.attend(q, k, v, scale=attn.scale, attn_mask=mask)
        return attn.proj_drop(attn.proj(merge_heads(out)))

    return install_forward(attn, forward)


def kinds() -> list[AttentionKind]:
    from mmseg.models.backbones.beit import BEiTAttention

    def matches(m) -> bool:
        return isinstance(m, BEiTAttention) and type(m).forward is BEiTAttention.forward

    return [AttentionKind("mmseg BEiTAttention", matches, _install_beit)]


def _install_layer(site: BlockSite):
    layer = site.block

    def forward(x):
        site.enter(x)
        x = layer.attn(layer.norm1(x), identity=x)  # mmcv's wrapper adds the residual itself
        x = site.between(x)
        return layer.ffn(layer.norm2(x), identity=x)

    return install_forward(layer, forward)


def block_kinds() -> list[BlockKind]:
    from mmseg.models.backbones.vit import TransformerEncoderLayer

    def matches(m) -> bool:
        return type(m) is TransformerEncoderLayer

    return [BlockKind("mmseg vit.TransformerEncoderLayer", matches, _install_layer)]


def _vit_forward(vit) -> Callable:
    """mmseg ``VisionTransformer.forward`` with every tapped layer's tokens restored to the full grid."""

    def reshape(tokens: torch.Tensor, hw: tuple[int, int]):
        patches = tokens[:, 1:] if vit.with_cls_token else tokens
        b, _, c = patches.shape
        out = patches.reshape(b, hw[0], hw[1], c).permute(0, 3, 1, 2).contiguous()
        return [out, tokens[:, 0]] if vit.output_cls_token else out

    def forward(inputs):
        b = inputs.shape[0]
        x, hw = vit.patch_embed(inputs)
        x = torch.cat((vit.cls_token.expand(b, -1, -1), x), dim=1)
        x = vit._pos_embeding(x, hw, vit.pos_embed)
        if not vit.with_cls_token:
            x = x[:, 1:]
        if vit.pre_norm:
            x = vit.pre_ln(x)
        outs = [reshape(x, hw)] if vit.out_origin else []
        last = len(vit.layers) - 1
        for i, layer in enumerate(vit.layers):
            x = layer(x)
            if i == last and vit.final_norm:
                x = vit.norm1(x)
            if i in vit.out_indices:
                outs.append(reshape(restore_tokens(layer, x), hw))
        return tuple(outs)

    return forward


def install_flow_owner(model: torch.nn.Module) -> list[Callable[[], None]]:
    """Give each mmseg ``VisionTransformer`` in ``model`` a forward that restores tapped layers' tokens."""
    from mmseg.models.backbones.vit import VisionTransformer

    return [install_forward(m, _vit_forward(m)) for m in model.modules()
            if type(m) is VisionTransformer and type(m).forward is VisionTransformer.forward]


ADAPTER = HostAdapter("mmseg", tuple(LOOKS_FOR), kinds, blocks=tuple(BLOCKS), block_kinds=block_kinds,
                      install_flow_owner=install_flow_owner)
