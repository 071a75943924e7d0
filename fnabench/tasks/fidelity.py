"""``fidelity:images`` / ``fidelity:synthetic``: how far a variant moves a model's features.

Label-free, so it works for any model: the relative error and cosine similarity of the final
features of the patched model against the same model with exact attention, on offline images at
any size; optionally per block (the residual stream after each block, on the first few images).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fnabench.data.images import offline_images
from fnabench.models.loaded import LoadedModel
from fnabench.patching.core import find_blocks
from fnabench.patching.sites import restore_tokens
from fnabench.tasks.base import FLAG, Settings, TaskError, check_options, embed_all, positive_int


@dataclass
class Prepared:
    images: torch.Tensor  # [N, 3, S, S] preprocessed
    names: list[str]
    reference: torch.Tensor  # [N, D] exact-attention features
    block_reference: list[torch.Tensor] | None


class FidelityTask:
    """Feature fidelity of a variant against exact attention."""

    primary = "cos_sim"

    def __init__(self, source: str, per_block: bool = False, per_block_images: int = 2,
                 num_synthetic: int = 8) -> None:
        if source not in ("images", "synthetic"):
            raise TaskError(f"unknown fidelity source {source!r}; accepted: fidelity:images, fidelity:synthetic")
        self.source, self.per_block = source, per_block
        self.per_block_images, self.num_synthetic = per_block_images, num_synthetic
        self.name = f"fidelity:{source}"
        self.higher_is_better = {"cos_sim": True, "cos_sim_min": True, "rel_err": False, "rel_err_max": False}

    def prepare(self, loaded: LoadedModel, settings: Settings) -> Prepared:
        named = offline_images(self.source, settings.limit, settings.seed, self.num_synthetic)
        images = torch.stack([loaded.preprocess(img) for _, img in named])
        reference = embed_all(loaded, images, settings, "fidelity: exact")
        blocks = self._block_outputs(loaded, images, settings) if self.per_block else None
        return Prepared(images, [n for n, _ in named], reference, blocks)

    def example_batch(self, prepared: Prepared, settings: Settings) -> torch.Tensor:
        return prepared.images[: settings.batch_size]

    def items(self, prepared: Prepared) -> dict[str, int]:
        """The images the means and extremes are taken over."""
        return {"test": int(prepared.images.shape[0])}

    def evaluate(self, loaded: LoadedModel, prepared: Prepared, settings: Settings) -> dict[str, float]:
        feats = embed_all(loaded, prepared.images, settings, f"{self.name}")
        ref = prepared.reference
        rel = (feats - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-12)
        cos = F.cosine_similarity(feats, ref, dim=-1)
        metrics = {"cos_sim": cos.mean().item(), "cos_sim_min": cos.min().item(),
                   "rel_err": rel.mean().item(), "rel_err_max": rel.max().item()}
        if prepared.block_reference is not None:
            for i, (now, ref_block) in enumerate(zip(self._block_outputs(loaded, prepared.images, settings),
                                                     prepared.block_reference, strict=True)):
                metrics[f"rel_err_block{i}"] = ((now - ref_block).norm() / ref_block.norm()).item()
                self.higher_is_better[f"rel_err_block{i}"] = False
        if not all(torch.isfinite(torch.tensor(list(metrics.values())))):
            raise FloatingPointError(f"non-finite fidelity metrics: {metrics}")
        return metrics

    @torch.no_grad()
    def _block_outputs(self, loaded: LoadedModel, images: torch.Tensor, settings: Settings) -> list[torch.Tensor]:
        """Output of every image-tower block for the first ``per_block_images`` images."""
        blocks = find_blocks(loaded.model, "image")
        captured: list[torch.Tensor] = []

        def grab(module, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            out = restore_tokens(module, out)  # a token flow's merged tokens back at every position
            captured.append(out.detach().float().cpu())

        hooks = [b.register_forward_hook(grab) for b in blocks]
        try:
            loaded.embed(images[: self.per_block_images].to(device=settings.device, dtype=settings.dtype))
        finally:
            for h in hooks:
                h.remove()
        return captured


OPTIONS = {"per_block": FLAG, "per_block_images": positive_int(1), "num_synthetic": positive_int(1)}


def make_task(source: str, **options) -> FidelityTask:
    """Registry factory: ``fidelity:<source>`` with options per_block, per_block_images, num_synthetic."""
    return FidelityTask(source, **check_options(f"fidelity:{source}", options, OPTIONS))


make_task.options = OPTIONS  # what `fnabench list tasks` shows
