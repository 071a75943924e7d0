"""What a task is: data plus a metric, prepared once per model with exact attention, then
evaluated once per variant with the variant patched in."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..adapters.loading import LoadedModel


class TaskError(ValueError):
    """A task that cannot run as asked (unknown dataset, bad option); one line saying what is accepted."""


@dataclass
class Settings:
    """Sweep settings a task reads: where and how to run, how much data."""

    image_size: int | None = None
    batch_size: int = 8
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    limit: int | None = None
    seed: int = 0
    quiet: bool = True
    progress: Callable[[Iterable, str, int | None], Iterable] = field(default=lambda it, desc, total: it)


class Task(Protocol):
    """A task: ``prepare`` runs with exact attention (reference outputs, cached text sides),
    ``evaluate`` runs with the cell's variant patched in and returns metrics."""

    name: str
    primary: str
    higher_is_better: dict[str, bool]

    def prepare(self, loaded: LoadedModel, settings: Settings) -> Any: ...

    def example_batch(self, prepared: Any, settings: Settings) -> torch.Tensor: ...

    def evaluate(self, loaded: LoadedModel, prepared: Any, settings: Settings) -> dict[str, float]: ...


def batches(x: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    """Consecutive slices of ``x`` along dim 0."""
    for start in range(0, x.shape[0], size):
        yield x[start:start + size]


@torch.no_grad()
def embed_all(loaded: LoadedModel, images: torch.Tensor, settings: Settings, desc: str = "embed") -> torch.Tensor:
    """Final features of every image, in batches, on the settings' device and dtype; float32 on CPU out."""
    out = []
    steps = (images.shape[0] + settings.batch_size - 1) // settings.batch_size
    for batch in settings.progress(batches(images, settings.batch_size), desc, steps):
        feats = loaded.embed(batch.to(device=settings.device, dtype=settings.dtype))
        out.append(feats.float().cpu())
    return torch.cat(out)
