"""``analyze(model, inputs) -> Report``: run a model over inputs under exact (optionally masked) attention
and return the residual-norm, massive-activation and attention-sink analysis (report.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fnabench.analysis.capture import AnalysisInputError, watch
from fnabench.analysis.report import Report, Thresholds
from fnabench.models.loaded import LoadedModel


def _as_batchable(model: nn.Module | LoadedModel, inputs: Any) -> tuple[torch.Tensor | list, list[str]]:
    """Inputs as a stackable tensor (or a list of dicts), with a name for each."""
    if isinstance(inputs, torch.Tensor):
        return inputs, [f"input/{i}" for i in range(inputs.shape[0])]
    items = list(inputs)
    if not items:
        raise AnalysisInputError("analysis needs at least one input (an image or a sequence)")
    names = [f"input/{i}" for i in range(len(items))]
    if all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items):  # (name, item) pairs
        names, items = [x[0] for x in items], [x[1] for x in items]
    if all(isinstance(x, torch.Tensor) for x in items):
        return torch.stack(items), names
    if all(isinstance(x, dict) for x in items):
        return items, names
    preprocess = getattr(model, "preprocess", None)
    if preprocess is None:
        raise AnalysisInputError(f"analysis got {type(items[0]).__name__} inputs and a bare module: give tensors, "
                                 "or a LoadedModel (fnabench.load_model) whose preprocess turns images into tensors")
    return torch.stack([preprocess(x) for x in items]), names


def _prefix_kinds(module: nn.Module, num_prefix: int) -> list[str]:
    """The prefix tokens' kinds: CLS first (unless the model has no class token), registers after."""
    if num_prefix == 0:
        return []
    no_cls = any(hasattr(m, "cls_token") and m.cls_token is None and hasattr(m, "reg_token")
                 for m in module.modules())
    kinds = ["register"] * num_prefix
    if not no_cls:
        kinds[0] = "CLS"
    return kinds


def _grid(tokens: int, num_prefix: int, causal: bool) -> tuple[int, int] | None:
    """A square patch grid when the patch tokens make one."""
    side = math.isqrt(tokens - num_prefix)
    return (side, side) if not causal and side * side == tokens - num_prefix and side > 0 else None


def _forward_of(model: nn.Module | LoadedModel) -> tuple[nn.Module, Callable]:
    if isinstance(model, LoadedModel):
        return model.model, model.embed
    if isinstance(model, nn.Module):
        def forward(batch):
            return model(**batch) if isinstance(batch, dict) else model(batch)
        return model, forward
    raise AnalysisInputError(f"analyze() needs a torch.nn.Module or a LoadedModel, got {type(model).__name__}")


def analyze(model: nn.Module | LoadedModel, inputs: Any, *, variant: str = "exact",
            thresholds: Thresholds | None = None, batch_size: int = 8, device: str | torch.device | None = None,
            dtype: torch.dtype | None = None, progress: bool = False, name: str | None = None,
            meta: dict | None = None) -> Report:
    """Residual-stream norms, massive activations and attention sinks of ``model`` over ``inputs``.

    ``model``: a :class:`LoadedModel` (``fnabench.load_model``) or any module :func:`fnabench.patch` can patch
    (a vision tower, or a decoder LM called as ``model(batch)``). ``inputs``: PIL images (with a LoadedModel),
    a tensor whose first axis is the input, a list of tensors, dicts of keyword arguments, or (name, input)
    pairs. ``variant``: ``exact`` or a ``mask:...`` spec (the ablation). Returns a :class:`Report`.
    """
    thresholds = (thresholds or Thresholds()).check()
    if batch_size < 1:
        raise AnalysisInputError(f"batch_size must be >= 1, got {batch_size}")
    module, forward = _forward_of(model)
    items, names = _as_batchable(model, inputs)
    param = next(module.parameters(), None)
    device = torch.device(device) if device is not None else (param.device if param is not None else "cpu")
    dtype = dtype or (param.dtype if param is not None else torch.float32)
    watched = watch(module, variant)
    try:
        from tqdm.auto import tqdm

        total = len(names)
        bar = tqdm(total=total, disable=not progress, desc=f"analyze {name or type(module).__name__}",
                   unit="input", dynamic_ncols=True)
        with bar:
            for start in range(0, total, batch_size):
                chunk = items[start:start + batch_size]
                if isinstance(chunk, list):  # dicts of keyword arguments, one input each
                    for one in chunk:
                        watched.run({k: _to(v, device, dtype) for k, v in one.items()}, forward)
                else:
                    watched.run(_to(chunk, device, dtype), forward)
                bar.update(len(chunk))
    finally:
        watched.close()
    arrays = watched.captured.stacked()
    tokens = arrays["norms"].shape[-1]
    prefix = watched.num_prefix
    return Report(model=name or getattr(model, "name", type(module).__name__),
                  variant=watched.handle.variant.canonical, names=names, num_prefix=prefix,
                  prefix_kinds=_prefix_kinds(module, prefix), causal=watched.causal, thresholds=thresholds,
                  arrays=arrays, grid=_grid(tokens, prefix, watched.causal), meta=dict(meta or {}))


def _to(x: Any, device, dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    return x


def cos_sim(features: Sequence, reference: Sequence) -> torch.Tensor:
    """Per-input cosine similarity of flattened outputs [I, D] against a reference."""
    a, b = torch.as_tensor(features).double(), torch.as_tensor(reference).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)
