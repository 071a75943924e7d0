"""LLaVA-family vision–language models (transformers): loading, placing a variant, prompting, generating.

A variant's ``tower`` key says where it goes in a LLaVA model: ``image`` is the vision tower (its
encoder attention), ``text`` the language model (causal attention, prefill approximated, decoding on
the KV cache it leaves), ``all`` both. lmms-eval's ``placement=vision|language|both`` maps onto it
(:func:`place`). Everything here works on ``LlavaForConditionalGeneration`` and, where transformers'
classes keep the same layout (``model.vision_tower``/``model.visual`` and ``model.language_model``),
on LLaVA-NeXT and Qwen2-VL-style models.

The prefill path (:func:`model_inputs`) encodes the images through the (patched) vision tower first;
when a token-flow variant leaves fewer image features than the prompt has placeholder tokens
(VisionZip-style reduction), the run of placeholders is shortened to match, so the language model
sees the reduced sequence, as the method intends.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fnabench._errors import UserError
from fnabench._extras import require
from fnabench.data.generated import vqa as scenes
from fnabench.models.loaded import LoadedModel, ModelInputError, describe_load_failure
from fnabench.variants import Variant, parse_variant
from fnabench.variants.spec import COMPONENTS

#: where a variant goes, in the spec's own word (``tower``), and the lmms-eval ``placement=`` words kept as aliases
TOWERS = ("image", "text", "all")
PLACEMENTS = {"vision": "image", "language": "text", "both": "all"}
#: transformers classes this module loads (AutoModelForImageTextToText picks the right one from the config)
FAMILIES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
            "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
FALLBACK_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


class PlacementError(UserError, ValueError):
    """A tower that is not one of image, text, all (or vision, language, both), or that contradicts the spec's."""


def place(spec: str | Variant, placement: str | None) -> Variant:
    """``spec`` with its components' ``tower`` set to ``placement``: a tower (image, text, all), or its alias
    (vision → image, language → text, both → all). A tower the spec names itself must agree; ``None`` leaves
    the spec as written.

    ``language`` and ``both`` resolve the keys the spec leaves out to their causal-safe defaults
    (``Variant.for_causal``: stride landmarks, ridge inverse); keys it names stay."""
    variant = parse_variant(spec)
    if placement is None:  # the spec says where: in the language model its unnamed keys are the causal-safe ones
        return variant.for_causal() if "text" in variant.towers() else variant
    if placement not in TOWERS and placement not in PLACEMENTS:
        raise PlacementError(f"unknown placement {placement!r}; accepted: {', '.join(TOWERS)} (or their aliases "
                             f"{', '.join(PLACEMENTS)})")
    tower = PLACEMENTS.get(placement, placement)
    parts = []
    for component in (variant.core, variant.mask, variant.flow):
        if component is None or "tower" not in component.values:
            parts.append(component)
            continue
        if "tower" in component.given and component["tower"] != tower:
            raise PlacementError(f"placement={placement} puts the variant in tower={tower}, but {spec!r} names "
                                 f"tower={component['tower']}; accepted: drop one of the two, or make them agree")
        if tower not in _accepted_towers(component):
            raise PlacementError(f"{component.name} runs only in tower={'|'.join(_accepted_towers(component))}, "
                                 f"not placement={placement}")
        parts.append(component.with_values(tower=tower))
    placed = Variant(*parts)
    # in the language model the unnamed defaults are the causal-safe ones (stride landmarks, ridge); with
    # both, one component serves both towers, so they are there too (the harness resolves it the same way)
    return placed.for_causal() if tower in ("text", "all") else placed


def _accepted_towers(component) -> tuple[str, ...]:
    return tuple(COMPONENTS[component.name]["tower"].accepts.split(" | "))


def is_multimodal(model: torch.nn.Module) -> bool:
    """A LLaVA-family model: a vision tower and a language model under ``model.model``."""
    inner = getattr(model, "model", None)
    return inner is not None and hasattr(inner, "language_model") and (
        hasattr(inner, "vision_tower") or hasattr(inner, "visual"))


def image_token_id(config) -> int:
    """The placeholder token id that marks image positions in ``input_ids``."""
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ModelInputError(f"{type(config).__name__} names no image token (image_token_id); is it a LLaVA model?")


# ---------------------------------------------------------------------------------------------
# prompting and the prefill path


def prompt_text(processor, question: str, images: int = 1) -> str:
    """The chat-template prompt for ``images`` images (before the text) and one question; LLaVA-1.5's
    template where the processor has none."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return FALLBACK_TEMPLATE.replace("<image>\n", "<image>\n" * images).format(question=question)


def encode(processor, texts: list[str], images: list[list[Any]]) -> dict[str, torch.Tensor]:
    """Processor output for a batch of prompts and their images (left-padded, like generation wants)."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    flat = [im for group in images for im in group] or None
    return dict(processor(images=flat, text=texts, return_tensors="pt", padding=True))


def _reduces_visual_tokens(model) -> bool:
    handle = model.__dict__.get("_fnabench_patch")
    if handle is None or not handle.active:
        return False
    state = handle.states.get("image")  # a token flow in the vision tower may hand over fewer features
    return state is not None and state.flow is not None


def model_inputs(model, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``inputs`` ready for ``model(**…)`` / ``model.generate(**…)`` on the model's device and dtype.

    Where the patched vision tower hands over fewer image features than the prompt has placeholders
    (a token-flow variant reducing visual tokens), the images are encoded here and each row's run of
    placeholders is cut to its number of features (one image per row, unpadded rows).
    """
    param = next(model.parameters())
    out = {k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
           for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    if "pixel_values" not in out or not _reduces_visual_tokens(model):
        return out
    if "image_sizes" in out or not hasattr(model.model, "vision_tower"):
        raise UserError(f"a token flow in the vision tower hands {type(model).__name__} fewer image features than "
                        "its tiles fill (LLaVA-NeXT re-assembles tiles into a grid); accepted there: attention "
                        "variants in the vision tower, fastv in the language model")
    kwargs: dict[str, Any] = {}
    encoded = model.model.get_image_features(pixel_values=out.pop("pixel_values"), return_dict=True, **kwargs)
    out.pop("image_sizes", None)
    features = list(encoded.pooler_output)
    token = image_token_id(model.config)
    ids, mask = out["input_ids"], out.get("attention_mask")
    if len(features) != ids.shape[0] or (mask is not None and not bool(mask.all())):
        raise UserError("a variant that reduces visual tokens needs one image per prompt and unpadded prompts; "
                        "accepted: batch size 1, or prompts of equal length")
    rows = []
    for row, feats in zip(ids, features, strict=True):
        where = torch.nonzero(row == token).flatten()
        keep = torch.ones_like(row, dtype=torch.bool)
        keep[where[feats.shape[0]:]] = False
        rows.append(row[keep])
    out["input_ids"] = torch.stack(rows)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    out["mm_encoder_outputs"] = {"image": encoded}
    return out


@torch.no_grad()
def generate(model, processor, inputs: dict[str, torch.Tensor], **kwargs) -> list[str]:
    """Greedy continuations (the new tokens only, decoded) of a batch from :func:`encode`."""
    prepared = model_inputs(model, inputs)
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("pad_token_id", processor.tokenizer.pad_token_id)
    out = model.generate(**prepared, **kwargs)
    new = out[:, prepared["input_ids"].shape[1]:]
    return processor.tokenizer.batch_decode(new, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# loading


def load_pretrained(source: str, *, dtype: torch.dtype | str | None = None, device: str | None = None):
    """(model, processor) from a local checkpoint folder or a hub id, through transformers' own cache."""
    tr = require("transformers")
    try:
        processor = tr.AutoProcessor.from_pretrained(source)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = tr.AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        if Path(source).exists():
            raise ModelInputError(f"{source}: not a transformers LLaVA checkpoint folder ({type(err).__name__}: "
                                  f"{' '.join(str(err).split())[:160]})") from None
        raise describe_load_failure(f"llava:{source}", err) from None
    if not is_multimodal(model):
        raise ModelInputError(f"{source} loads as {type(model).__name__}, not a LLaVA-family model; accepted: "
                              + ", ".join(FAMILIES))
    if device is not None:
        model.to(device)
    return model.eval(), processor


def example_image(size: int = 336):
    """A fixed generated scene: the image every FLOP count and timing of a LLaVA model prefills."""
    return scenes.scenes(1, seed=99)[0].image(size)


def loaded_model(name: str, model, processor) -> LoadedModel:
    """The harness's view of a LLaVA model: ``embed(input_ids)`` is the prefill of a prompt with the fixed
    example image (vision tower, projector, language model) returning the first token's logits, so the
    runner's FLOP count and timing are prefill FLOPs and time-to-first-token."""
    image = example_image(_image_side(processor))
    pixels = {k: v for k, v in processor(images=[image], text=["<image>"], return_tensors="pt").items()
              if k not in ("input_ids", "attention_mask")}

    def prompt_ids(question: str) -> torch.Tensor:
        return encode(processor, [prompt_text(processor, question)], [[image]])["input_ids"]

    def inputs(ids: torch.Tensor) -> dict[str, Any]:
        ids = ids.long()
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        batch |= {k: torch.cat([v] * ids.shape[0]) for k, v in pixels.items()}
        return model_inputs(model, batch)

    def embed(ids: torch.Tensor) -> torch.Tensor:
        return model(**inputs(ids), use_cache=False, logits_to_keep=1).logits[:, -1]

    size = _image_side(processor)
    return LoadedModel(name, model, preprocess=lambda x: x, embed=embed, image_size=size, family="llava",
                       extra={"processor": processor, "prompt_ids": prompt_ids,
                              "decoder": _Decoder(model, inputs)})


class _Decoder:
    """Prefill and one decoding step, for the runner's KV-cache measurements (``kv_cache`` in records)."""

    def __init__(self, model, inputs: Callable[[torch.Tensor], dict]) -> None:
        self.model, self.inputs = model, inputs

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor):
        return self.model(**self.inputs(ids), use_cache=True, logits_to_keep=1).cache

    @torch.no_grad()
    def step(self, token: torch.Tensor, cache) -> torch.Tensor:
        return self.model(input_ids=token.long(), cache=cache, use_cache=True).logits[:, -1]


def _image_side(processor) -> int:
    size = getattr(processor.image_processor, "size", None) or {}
    size = dict(size) if not isinstance(size, int) else {"height": size}
    return int(size.get("height") or size.get("shortest_edge") or 336)


def load_model(spec: str, *, image_size: int | None = None) -> LoadedModel:
    """``llava:<folder-or-hub-id>``: a LLaVA-family checkpoint (``image_size`` is the processor's own)."""
    if not spec:
        raise ModelInputError("llava: needs a checkpoint folder or hub id, e.g. llava:llava-hf/llava-1.5-7b-hf")
    if image_size is not None:
        raise ModelInputError(f"llava:{spec} takes images at its processor's size; accepted: no image_sizes "
                              "(leave image_sizes out of the sweep config)")
    model, processor = load_pretrained(spec)
    return loaded_model(f"llava:{spec}", model, processor)
