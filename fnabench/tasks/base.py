"""What a task is: data plus a metric, prepared once per model with exact attention, then
evaluated once per variant with the variant patched in."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fnabench._errors import TaskError
from fnabench.models.loaded import LoadedModel


@dataclass(frozen=True)
class Option:
    """One task option a sweep config may set: its type, what values it takes, and a default.

    Tasks declare their options as a dict of these, so a config is checked against them before any
    model loads (a misspelt key, ``k = -3`` or ``k = "3"`` is one line, not a failed cell minutes later).
    """

    kind: type | tuple[type, ...]
    accepted: str  # what is accepted, in words: "an integer >= 1"
    valid: Callable[[Any], bool] = lambda value: True

    def check(self, task: str, key: str, value: Any) -> Any:
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        typed = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not typed or not self.valid(value):
            raise TaskError(f"{task}: option {key} = {value!r} is not accepted; accepted: {self.accepted}")
        return value


def positive_int(minimum: int = 1) -> Option:
    """An integer option that must be at least ``minimum``."""
    return Option(int, f"an integer >= {minimum}", lambda v: v >= minimum)


def number(low: float, *, inclusive: bool = True, high: float | None = None) -> Option:
    """A real-number option in ``[low, high]`` (``(low, high)`` when not ``inclusive``)."""
    def valid(v: float) -> bool:
        above = v >= low if inclusive else v > low
        below = high is None or (v <= high if inclusive else v < high)
        return above and below
    sign = ">=" if inclusive else ">"
    words = f"a number {sign} {low}" + (f" and {'<=' if inclusive else '<'} {high}" if high is not None else "")
    return Option((int, float), words, valid)


FLAG = Option(bool, "true or false")
TEXT = Option(str, "a string")
FOLDER = Option(str, "an existing directory", lambda v: Path(v).expanduser().is_dir())


def check_options(task: str, options: Mapping[str, Any] | None, declared: Mapping[str, Option]) -> dict[str, Any]:
    """``options`` checked against a task's declared options: known keys, right types, accepted values."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(declared))
    if unknown:
        raise TaskError(f"{task}: unknown option(s) {', '.join(map(repr, unknown))}; accepted: "
                        f"{', '.join(sorted(declared)) or 'none'}")
    return {key: declared[key].check(task, key, value) for key, value in options.items()}


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
    ``evaluate`` runs with the cell's variant patched in and returns metrics.

    Optionally, ``items(prepared)`` says how many items stand behind the metrics (``{"test": n, ...}``)
    and ``proportions`` maps metrics that are a share of those items to (items key, scale: 100 for
    percent), so leaderboards can give each number its sample size and standard error.

    A task whose cells should be measured on something other than the model's features names it:
    ``measures`` (e.g. ``"logits"``) and ``forward(loaded)`` returning the batch → output callable whose
    FLOPs, latency and memory the runner records. ``evaluate`` may return, beside its metrics, a
    ``"details"`` dict (per-class scores, settings it used) that the record keeps as it is.
    """

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
