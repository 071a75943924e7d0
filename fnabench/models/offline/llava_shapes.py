"""``offline:llava-shapes``: LLaVA on offline:dinov2-s with a small language model trained here on generated VQA
scenes (llava_shapes_training.py; architecture in llava_shapes_arch.py), trained once on first use and cached."""

from __future__ import annotations

from fnabench.models.llava import load_pretrained, loaded_model
from fnabench.models.loaded import LoadedModel, ModelInputError
from fnabench.models.offline.llava_shapes_training import train


def load_model(spec: str, *, image_size: int | None = None) -> LoadedModel:
    """``offline:llava-shapes``: the offline VQA model, trained here on first use and cached."""
    if image_size is not None:
        raise ModelInputError(f"offline:{spec} takes {spec}'s own image size; accepted: no image_sizes")
    folder = train()
    model, processor = load_pretrained(str(folder))
    return loaded_model(f"offline:{spec}", model, processor)
