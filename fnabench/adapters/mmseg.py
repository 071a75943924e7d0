"""fnabench inside mmsegmentation 1.x, loaded from any mmseg config by one line::

    custom_imports = dict(imports=['fnabench.adapters.mmseg'], allow_failed_imports=False)
    custom_hooks = [dict(type='FNAPatchHook', variant='fna:m=64,layers=-6:')]

Importing this module registers, in mmseg's registries:

- ``FNAPatchHook`` (HOOKS): patches ``runner.model.backbone`` with any fnabench variant before the val/test
  loop and removes the patch after it, so a stock config plus one ``custom_hooks`` entry evaluates FNA,
  Nyström, masking or ToMe, and training in between runs the unpatched model;
- ``FnabenchBackbone`` (MODELS): serves any fnabench model (``offline:dinov2-s``, ``timm:…``, ``hf:…``) to
  mmseg decode heads as patch-token feature maps of chosen blocks, as DINOv2's linear and multi-layer
  segmentation protocol does (final LayerNorm on each tapped block, optional CLS token concatenated);
- ``LinearBNHead`` (MODELS): DINOv2's linear head (BatchNorm, then a 1×1 convolution) for mmseg 1.x, with
  DINOv2's parameter names (``bn``, ``conv_seg``), so its published linear heads load;
- ``SyntheticTexturesDataset`` (DATASETS): the offline textured-shapes set of
  :mod:`fnabench.data.generated.segmentation`, generated on first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmengine.hooks import Hook
from mmengine.model import BaseModule, is_model_wrapper
from mmseg.datasets import BaseSegDataset
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.registry import DATASETS, HOOKS, MODELS

from fnabench._errors import UserError
from fnabench.data.generated import segmentation as seg_synthetic
from fnabench.models.registry import load_model
from fnabench.patching.core import _num_prefix, find_blocks, patch
from fnabench.patching.sites import restore_tokens
from fnabench.variants import parse_variant

# ---------------------------------------------------------------------------------------------
# the hook


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if is_model_wrapper(model) else model


@HOOKS.register_module()
class FNAPatchHook(Hook):
    """Patch the segmentor's ``target`` (default: its backbone) with ``variant`` for validation and testing.

    ``variant`` is any fnabench spec (``'fna:m=64,layers=-6:'``, ``'tome:r=8'``, ``'exact'``); ``phases``
    says which loops run patched. The patch is removed when the loop ends, whatever happens in it.
    """

    priority = "NORMAL"

    def __init__(self, variant: str = "fna:m=64", target: str = "backbone",
                 phases: Sequence[str] = ("val", "test")) -> None:
        self.variant = parse_variant(variant)  # a bad spec fails when the config is built, in one line
        self.target = target
        unknown = set(phases) - {"val", "test"}
        if unknown:
            raise UserError(f"FNAPatchHook: unknown phases {sorted(unknown)}; accepted: val, test")
        self.phases = tuple(phases)
        self._handle = None

    def _patch(self, runner, phase: str) -> None:
        if phase not in self.phases or self._handle is not None:
            return
        model = _unwrap(runner.model)
        module = model.get_submodule(self.target) if self.target else model
        self._handle = patch(module, self.variant)
        runner.logger.info(f"fnabench: {self.target or 'model'} patched with {self.variant.canonical} "
                           f"({len(self._handle.sites)} attention modules) for {phase}")

    def _remove(self, runner) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def before_val(self, runner) -> None:
        self._patch(runner, "val")

    def after_val(self, runner) -> None:
        self._remove(runner)

    def before_test(self, runner) -> None:
        self._patch(runner, "test")

    def after_test(self, runner) -> None:
        self._remove(runner)


# ---------------------------------------------------------------------------------------------
# the backbone

#: models handed to FnabenchBackbone by name instead of loaded again (the harness serves its loaded model)
_SERVED: dict[str, object] = {}


@contextmanager
def serving(name: str, loaded) -> object:
    """While open, ``FnabenchBackbone(model=name)`` uses ``loaded`` (a LoadedModel) instead of loading it."""
    previous = _SERVED.get(name)
    _SERVED[name] = loaded
    try:
        yield loaded
    finally:
        if previous is None:
            _SERVED.pop(name, None)
        else:
            _SERVED[name] = previous


class _Stop(Exception):
    """Raised by the last tapped block: the blocks after it are not needed."""


@MODELS.register_module()
class FnabenchBackbone(BaseModule):
    """Any fnabench vision model as an mmseg backbone: patch-token feature maps of ``out_indices`` blocks.

    Args:
        model: a fnabench model name (``fnabench list models``).
        image_size: the size the model is built for (position embeddings); inputs are padded (centred, as
            DINOv2 does) to a multiple of the patch size, and a timm model takes other sizes by resampling
            its position embeddings.
        out_indices: blocks whose outputs become feature maps (negative counts from the end).
        final_norm: apply the model's final LayerNorm to each tapped block (DINOv2's protocol).
        cls_token: concatenate the CLS token to every patch feature (channels double).
        frozen: no gradients into the model, kept in eval mode, and left out of the state dict (checkpoints
            then hold the head only; the weights come from the model registry).
        cache_features: while training a head on a frozen model, keep each training input's feature maps
            (float16, keyed by the input's bytes) so later epochs skip the backbone; never used in eval mode.
    """

    def __init__(self, model: str = "offline:dinov2-s", image_size: int | None = None,
                 out_indices: Sequence[int] = (-1,), final_norm: bool = True, cls_token: bool = False,
                 frozen: bool = True, cache_features: bool = False, init_cfg=None) -> None:
        super().__init__(init_cfg)

        loaded = _SERVED.get(model) or load_model(model, image_size=image_size)
        self.name = model
        self.model = loaded.model
        self.family, self.patch, self.width, norm, self.run = _describe(loaded)
        self._norm = (norm,)  # the model's own final norm, not registered twice (state dict, .to())
        self.blocks = find_blocks(self.model)
        depth = len(self.blocks)
        self.out_indices = [i % depth for i in out_indices]
        if any(not -depth <= i < depth for i in out_indices):
            raise UserError(f"FnabenchBackbone({model}): out_indices {list(out_indices)} outside its {depth} blocks")
        self.prefix = _num_prefix(self.model, _list_path(self.model, self.blocks[0]), "image")
        self.final_norm, self.cls_token, self.frozen = final_norm, cls_token, frozen
        self.cache_features = cache_features and frozen
        self._cache: dict[bytes, list[torch.Tensor]] = {}
        self.out_channels = [self.width * (2 if cls_token else 1)] * len(self.out_indices)
        if frozen:
            for p in self.model.parameters():
                p.requires_grad_(False)
            self._register_state_dict_hook(_drop_model_keys)
            self._register_load_state_dict_pre_hook(_ignore_model_keys)

    def init_weights(self) -> None:
        """The model's weights come from the registry: mmengine's initialisers must not touch them."""

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not (self.training and self.cache_features):
            return self._features(x)
        import hashlib

        keys = [hashlib.sha1(sample.detach().cpu().numpy().tobytes()).digest() for sample in x]
        if not all(k in self._cache for k in keys):
            maps = self._features(x)
            for i, key in enumerate(keys):
                self._cache[key] = [m[i].detach().half() for m in maps]
        return tuple(torch.stack([self._cache[k][j] for k in keys]).to(x.dtype) for j in range(len(self.out_indices)))

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.patch, (-w) % self.patch
        if ph or pw:  # centred padding to whole patches, as DINOv2's segmentation code does
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        grid = (x.shape[-2] // self.patch, x.shape[-1] // self.patch)
        taps: dict[int, torch.Tensor] = {}
        last = max(self.out_indices)

        def tap(index):
            def hook(block, _args, output):
                out = output[0] if isinstance(output, tuple) else output
                taps[index] = restore_tokens(block, out)
                if index == last:
                    raise _Stop

            return hook

        hooks = [self.blocks[i].register_forward_hook(tap(i)) for i in sorted(set(self.out_indices))]
        try:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
                self.run(x)
        except _Stop:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        return tuple(self._feature_map(taps[i], grid) for i in self.out_indices)

    def _feature_map(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.final_norm and self._norm[0] is not None:
            tokens = self._norm[0](tokens)
        patches = tokens[:, self.prefix:]
        b, n, c = patches.shape
        if n != grid[0] * grid[1]:
            raise RuntimeError(f"FnabenchBackbone({self.name}): {n} patch tokens for a {grid[0]}x{grid[1]} grid")
        fmap = patches.transpose(1, 2).reshape(b, c, *grid)
        if self.cls_token:
            fmap = torch.cat([fmap, tokens[:, 0, :, None, None].expand(-1, -1, *grid)], dim=1)
        return fmap.contiguous()


def _drop_model_keys(module, state_dict, prefix, _local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + "model.")]:
        del state_dict[key]
    return state_dict


def _ignore_model_keys(state_dict, prefix, _local_metadata, _strict, missing, unexpected, _errors):
    """A frozen model's weights are not in the checkpoint by design; keys of it that are present load."""


def _list_path(model: torch.nn.Module, block: torch.nn.Module) -> str:
    for name, module in model.named_modules():
        if module is block:
            return name.rsplit(".", 1)[0]
    return ""


def _describe(loaded):
    """(family, patch size, width, final norm, forward) of a loaded fnabench vision model."""
    model = loaded.model
    if hasattr(model, "patch_embed") and hasattr(model, "forward_features"):  # timm and offline:dinov2-s
        patch = model.patch_embed.patch_size[0]
        built = tuple(model.patch_embed.img_size)

        def run(x):
            if tuple(x.shape[-2:]) != built and not model.dynamic_img_size:
                _dynamic_timm(model)
            return model.forward_features(x)

        return "timm", patch, model.embed_dim, model.norm, run
    vision = getattr(model, "vision_model", model)
    config = getattr(vision, "config", None)
    if config is not None and hasattr(config, "patch_size"):  # transformers vision encoders
        norm = getattr(vision, "layernorm", None) or getattr(vision, "post_layernorm", None)

        def run(x):
            return vision(pixel_values=x, interpolate_pos_encoding=True)

        return "hf", config.patch_size, config.hidden_size, norm, run
    raise UserError(f"FnabenchBackbone({loaded.name}): no patch-token access for {type(model).__name__}; "
                    "accepted: timm ViTs (timm:…, offline:dinov2-s, tiny:vit) and transformers vision encoders (hf:…)")


def _dynamic_timm(model) -> None:
    """Let a timm ViT take any input size: position embeddings resampled per forward (timm's own switch)."""
    from timm.layers import Format

    model.dynamic_img_size = True
    model.patch_embed.strict_img_size = False
    model.patch_embed.flatten = False
    model.patch_embed.output_fmt = Format.NHWC


# ---------------------------------------------------------------------------------------------
# the linear head


@MODELS.register_module()
class LinearBNHead(BaseDecodeHead):
    """DINOv2's linear segmentation head for mmseg 1.x: BatchNorm over the (concatenated) backbone channels,
    then ``conv_seg`` (1×1). With ``input_transform='resize_concat'`` and several ``in_index`` it is DINOv2's
    multi-layer head. ``channels`` must equal the summed input channels."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.channels != self.in_channels:
            raise UserError(f"LinearBNHead: channels ({self.channels}) must equal the summed in_channels "
                            f"({self.in_channels})")
        self.bn = build_norm_layer(self.norm_cfg or dict(type="BN"), self.in_channels)[1]

    def forward(self, inputs):
        return self.cls_seg(self.bn(self._transform_inputs(inputs)))


# ---------------------------------------------------------------------------------------------
# the offline dataset


@DATASETS.register_module()
class SyntheticTexturesDataset(BaseSegDataset):
    """fnabench's offline segmentation set (textured shapes and regions, masks by construction).

    ``split`` is ``train`` or ``test``; ``num_train``, ``num_test``, ``size`` and ``seed`` name the set,
    generated once under fnabench's cache (or ``data_root``).
    """

    METAINFO = dict(classes=seg_synthetic.CLASSES, palette=[list(c) for c in seg_synthetic.PALETTE])  # noqa: RUF012

    def __init__(self, split: str = "test", num_train: int = 160, num_test: int = 48, size: int = 448,
                 seed: int = 0, data_root: str | None = None, **kwargs) -> None:
        if split not in ("train", "test"):
            raise UserError(f"SyntheticTexturesDataset: unknown split {split!r}; accepted: train, test")
        root = seg_synthetic.ensure(data_root, num_train, num_test, size, seed)
        kwargs.setdefault("data_prefix", dict(img_path=f"img_dir/{split}", seg_map_path=f"ann_dir/{split}"))
        super().__init__(img_suffix=".png", seg_map_suffix=".png", reduce_zero_label=False,
                         data_root=str(root), **kwargs)
