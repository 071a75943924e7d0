"""timm ViTs: every softmax-over-tokens self-attention class timm's ViT family uses, recognised by class with
its exact ``forward`` (a subclass that overrides it is refused, never patched as its base).

- ``timm.layers.Attention`` (ViT, DeiT, DINOv2, SigLIP, hybrids, NaFlexViT; ``fused_attn`` on or off): q/k
  norm, the output gate and ``scale_norm`` kept; ``is_causal`` runs the variant causally, another
  ``attn_mask`` goes to it as is (exact honours it, an approximation refuses it in one line).
- ``timm.layers.AttentionRope`` (Perception Encoder, DeepSeek's ViT) and ``timm.models.eva.EvaAttention`` (EVA-02,
  the ``vit_*_rope_*`` models): q/k norm, then the rotary embedding on the non-prefix tokens as EVA applies it,
  fused or separate projections, EVA's q/v-only bias, grouped-query heads.
- ``timm.models.beit.Attention`` and ``timm.models.vision_transformer_relpos.RelPosAttention``: their relative
  position bias goes to the variant as an additive mask, which exact attention honours and an approximation
  refuses at the first forward, in one line naming the bias (as the mmseg BEiT kind does).

Run exact, by design, as the host wrote them: attention pooling heads (``AttentionPoolLatent``: a few latent
queries attend to the tokens, so the attention is already linear in N and is not self-attention, which is what
a variant approximates; ``AttentionPoolPrr``, ``AttentionPool2d``) and CaiT/XCiT class attention (the class
token alone queries). Refused by name at :func:`fnabench.patch` time (one line: the class and what it lacks):
window, partition, spatial-reduction, cross-covariance, talking-heads and differential attention, attention
fused into a parallel block, and any other ``timm.models`` attention class this module does not know.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fnabench._extras import require
from fnabench.patching.sites import (
    AttentionKind,
    BlockKind,
    BlockSite,
    HostAdapter,
    Site,
    additive_mask,
    install_forward,
    merge_heads,
    split_heads,
)
from fnabench.patching.torch_mha import attend_masked, overrides_forward, refuse_class

LOOKS_FOR = ["timm.layers.Attention", "timm.layers.AttentionRope", "timm.models.eva.EvaAttention",
             "timm.models.beit.Attention", "timm.models.vision_transformer_relpos.RelPosAttention"]
BLOCKS = ["timm.models.vision_transformer.Block"]

_WINDOW = "window attention (softmax within local windows, with a relative position bias)"
_PARTITION = "partition attention (softmax within windows or grid cells, with a relative position bias)"
_REDUCED = "spatial-reduction attention (keys and values from a downsampled grid: q and k differ in length)"
_CHANNELS = "cross-covariance attention (the softmax runs over channels, not tokens)"
#: timm attention classes fnabench cannot serve ("module.qualname"), and what each lacks
REFUSED = {
    "timm.models.swin_transformer.WindowAttention": _WINDOW,
    "timm.models.swin_transformer_v2.WindowAttention": _WINDOW,
    "timm.models.swin_transformer_v2_cr.WindowMultiHeadAttention": _WINDOW,
    "timm.models.twins.LocallyGroupedAttn": _WINDOW,
    "timm.models.davit.WindowAttention": _WINDOW,
    "timm.models.gcvit.WindowAttentionGlobal": _WINDOW,
    "timm.models.maxxvit.PartitionAttentionCl": _PARTITION,
    "timm.models.maxxvit.PartitionAttention2d": _PARTITION,
    "timm.models.maxxvit.ParallelPartitionAttention": _PARTITION,
    "timm.models.maxxvit.AttentionCl": "attention on a feature map with a relative position bias (MaxViT, CoAtNet)",
    "timm.models.maxxvit.Attention2d": "attention on a feature map with a relative position bias (MaxViT, CoAtNet)",
    "timm.models.pvt_v2.Attention": _REDUCED,
    "timm.models.twins.GlobalSubSampleAttn": _REDUCED,
    "timm.models.levit.Attention": "a learned attention bias per token pair (LeViT's attention_biases)",
    "timm.models.levit.AttentionDownsample": "attention downsampling (queries from a subsampled grid)",
    "timm.models.xcit.XCA": _CHANNELS,
    "timm.models.edgenext.CrossCovarianceAttn": _CHANNELS,
    "timm.models.davit.ChannelAttention": _CHANNELS,
    "timm.models.davit.ChannelAttentionV2": _CHANNELS,
    "timm.models.cait.TalkingHeadAttn": "talking-heads attention (heads are mixed before and after the softmax)",
    "timm.layers.diff_attention.DiffAttention": "differential attention (the difference of two softmax maps)",
    "timm.models.vision_transformer.ParallelScalingBlock": "attention fused into a parallel block (q, k, v and "
                                                           "the MLP from one in_proj): no attention module",
    "timm.models.vision_transformer.DiffParallelScalingBlock": "differential attention fused into a parallel "
                                                               "block (the difference of two softmax maps)",
    "timm.models.vision_transformer_sam.Attention": "relative position logits per query (SAM) and windowed blocks",
    "timm.models.crossvit.CrossAttention": "cross-attention between two token streams of different lengths",
    "timm.layers.attention2d.MultiQueryAttention2d": "attention on NCHW feature maps with downsampled keys",
    "timm.layers.attention2d.MultiQueryAttentionV2": "attention on NCHW feature maps with downsampled keys",
    "timm.layers.attention2d.Attention2d": "attention on NCHW feature maps",
}
#: run exact as timm wrote them, not refused: pooling heads and class attention (a few queries attend to the
#: tokens; not self-attention, and already linear in N)
EXACT_BY_DESIGN = {
    "timm.layers.attention_pool.AttentionPoolLatent",
    "timm.layers.attention_pool.AttentionPoolPrr",
    "timm.layers.attention_pool2d.AttentionPool2d",
    "timm.layers.attention_pool2d.RotAttentionPool2d",
    "timm.models.cait.ClassAttn",
    "timm.models.cait.LayerScaleBlockClassAttn",
}


def _qkv(attn, x: torch.Tensor):
    """q, k, v as [B, H, N, d] (k, v with the module's kv heads) from a fused ``qkv`` (with EVA/BEiT's separate
    q/k/v bias parameters where present) or from separate q/k/v projections."""
    b, n, _ = x.shape
    if attn.qkv is None:
        kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
        return (split_heads(attn.q_proj(x), attn.num_heads), split_heads(attn.k_proj(x), kv_heads),
                split_heads(attn.v_proj(x), kv_heads))
    if getattr(attn, "q_bias", None) is None:
        qkv = attn.qkv(x)
    else:
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = attn.qkv(x) + bias if getattr(attn, "qkv_bias_separate", False) else F.linear(x, attn.qkv.weight, bias)
    return qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _rotate(attn, t: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """The rotary embedding on the tokens after the prefix (CLS, registers), as EVA and AttentionRope apply it."""
    apply_rot_embed_cat = require("timm.layers").apply_rot_embed_cat
    npt = attn.num_prefix_tokens
    turned = apply_rot_embed_cat(t[:, :, npt:], rope, half=getattr(attn, "rotate_half", False))
    return torch.cat([t[:, :, :npt], turned], dim=2)


def _attend(site: Site, q, k, v, attn_mask, is_causal: bool) -> torch.Tensor:
    """timm's ``attn_mask`` / ``is_causal`` (SDPA's: bool True = attends, or additive) on the variant."""
    if is_causal:  # timm: is_causal takes precedence over attn_mask
        return site.attend(q, k, v, scale=site.module.scale, causal=True)
    mask = additive_mask(attn_mask, q.dtype, true_means_masked=False)
    return attend_masked(site, q, k, v, scale=site.module.scale, attn_mask=mask, source="timm's attn_mask")


def _finish(attn, out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """Merge heads, then the module's ``norm`` (scale_norm), output gate and projection."""
    out = attn.norm(merge_heads(out))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def _gate(attn, x: torch.Tensor) -> torch.Tensor | None:
    return attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None


def _install(site: Site):
    attn = site.module

    def forward(x, attn_mask=None, is_causal=False):
        gate = _gate(attn, x)
        q, k, v = _qkv(attn, x)
        q, k = attn.q_norm(q), attn.k_norm(k)
        return _finish(attn, _attend(site, q, k, v, attn_mask, is_causal), gate)

    return install_forward(attn, forward)


def _install_rope(site: Site):
    attn = site.module

    def forward(x, rope=None, attn_mask=None, is_causal=False):
        gate = _gate(attn, x)
        q, k, v = _qkv(attn, x)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is not None:
            q, k = _rotate(attn, q, rope).type_as(v), _rotate(attn, k, rope).type_as(v)
        groups = getattr(attn, "num_kv_groups", 1)
        if groups > 1:  # grouped-query heads: head h reads kv head h // groups, as AttentionRope expands them
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return _finish(attn, _attend(site, q, k, v, attn_mask, is_causal), gate)

    return install_forward(attn, forward)


def _attend_biased(site: Site, q, k, v, bias: torch.Tensor | None) -> torch.Tensor:
    """A relative position bias as the variant's additive mask: exact honours it, an approximation refuses."""
    source = f"{type(site.module).__module__.removeprefix('timm.models.')}.{type(site.module).__name__}'s relative " \
             "position bias"
    mask = None if bias is None else bias.to(q.dtype)
    return attend_masked(site, q, k, v, scale=site.module.scale, attn_mask=mask, source=source)


def _install_beit(site: Site):
    attn = site.module

    def forward(x, shared_rel_pos_bias=None):
        q, k, v = _qkv(attn, x)
        bias = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        return attn.proj_drop(attn.proj(merge_heads(_attend_biased(site, q, k, v, bias))))

    return install_forward(attn, forward)


def _install_relpos(site: Site):
    attn = site.module

    def forward(x, shared_rel_pos=None):
        q, k, v = _qkv(attn, x)
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = attn.rel_pos.get_bias() if attn.rel_pos is not None else shared_rel_pos  # timm's precedence
        return attn.proj_drop(attn.proj(merge_heads(_attend_biased(site, q, k, v, bias))))

    return install_forward(attn, forward)


def _served() -> list[tuple[str, type, object]]:
    """(label, class, install) for every class this module patches."""
    layers = require("timm.layers")
    eva, beit = require("timm.models.eva"), require("timm.models.beit")
    relpos = require("timm.models.vision_transformer_relpos")
    return [("timm.layers.Attention", layers.Attention, _install),
            ("timm.layers.AttentionRope", layers.AttentionRope, _install_rope),
            ("timm.models.eva.EvaAttention", eva.EvaAttention, _install_rope),
            ("timm.models.beit.Attention", beit.Attention, _install_beit),
            ("timm.models.vision_transformer_relpos.RelPosAttention", relpos.RelPosAttention, _install_relpos)]


@functools.cache
def _lacks(cls: type) -> str | None:
    """What a class lacks for fnabench to serve it, or None (a served class, not attention, not timm's)."""
    name = f"{cls.__module__}.{cls.__qualname__}"
    for label, base, _ in _served():
        if issubclass(cls, base):
            return None if cls.forward is base.forward else \
                f"it subclasses {label} with a forward of its own, which fnabench cannot reproduce"
    if not name.startswith("timm."):
        return None
    if name in REFUSED:
        return REFUSED[name]
    short = cls.__qualname__
    if (name.startswith("timm.models.") and name not in EXACT_BY_DESIGN and ("Attention" in short or "Attn" in short)
            and not short.endswith("Block")):
        return "an attention class fnabench does not know"
    return None


def _refuse_unservable(m) -> None:
    """Raise the one-line refusal if ``m`` is a timm attention (or a subclass of one) fnabench cannot serve."""
    lacks = _lacks(type(m))
    if lacks is not None:
        refuse_class(m, lacks, ", ".join(LOOKS_FOR))


def kinds() -> list[AttentionKind]:
    def matcher(base: type):
        def matches(m) -> bool:
            _refuse_unservable(m)
            return isinstance(m, base) and not overrides_forward(m, base)

        return matches

    return [AttentionKind(label, matcher(base), install) for label, base, install in _served()]


def _install_block(site: BlockSite):
    blk = site.block

    def forward(x, attn_mask=None, is_causal=False):
        site.enter(x)
        kwargs = {"attn_mask": attn_mask} if attn_mask is not None else {}
        if is_causal:
            kwargs["is_causal"] = True
        x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x), **kwargs)))
        x = site.between(x)
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    return install_forward(blk, forward)


def block_kinds() -> list[BlockKind]:
    Block = require("timm.models.vision_transformer").Block

    def matches(m) -> bool:
        return isinstance(m, Block) and type(m).forward is Block.forward

    return [BlockKind("timm.models.vision_transformer.Block", matches, _install_block)]


ADAPTER = HostAdapter("timm", tuple(LOOKS_FOR), kinds, blocks=tuple(BLOCKS), block_kinds=block_kinds)
