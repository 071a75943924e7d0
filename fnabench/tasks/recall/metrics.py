"""Metric arithmetic, independent of any model: per-position squared errors, "k after" an open label,
medians over traces, quartiles over haystack examples, and emergence points."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fnabench.tasks.recall.tokens import TokenLayout


def position_errors(pred: np.ndarray, tokens: np.ndarray, layout: TokenLayout) -> np.ndarray:
    """err[..., t] = ‖pred[..., t-1] − x_t‖² where token t is a payload; NaN at labels, pads and t = 0.

    ``pred`` [..., L-1, n] are the model outputs for inputs tokens[..., :L-1]; ``tokens`` is [..., L, dim].
    """
    target = layout.states(tokens[..., 1:, :]).astype(np.float64)
    err = ((np.asarray(pred, dtype=np.float64) - target) ** 2).sum(axis=-1)
    err = np.where(layout.is_payload(tokens[..., 1:, :]), err, np.nan)
    pad = np.full((*err.shape[:-1], 1), np.nan)
    return np.concatenate([pad, err], axis=-1)


def k_after(errors: np.ndarray, open_pos: int, ks: Sequence[int]) -> dict[int, np.ndarray]:
    """The error on the k-th observation after the open label at ``open_pos``: errors[..., open_pos + k]."""
    return {k: errors[..., open_pos + k] for k in ks}


def median_over_traces(values: np.ndarray) -> float:
    """Median over an example's traces (NaN-free by construction of the query)."""
    return float(np.median(values))


def quartiles(per_example: Sequence[float]) -> dict[str, float]:
    """25th/50th/75th percentiles over haystack examples of their per-example medians."""
    q25, q50, q75 = np.percentile(np.asarray(per_example, dtype=np.float64), [25, 50, 75])
    return {"q25": float(q25), "median": float(q50), "q75": float(q75)}


def first_below(values: Sequence[float], threshold: float) -> int | None:
    """Index of the first value strictly below ``threshold`` (None if none is)."""
    for i, v in enumerate(values):
        if v < threshold:
            return i
    return None


def stays_below(values: Sequence[float], threshold: float) -> int | None:
    """Index from which every later value is below ``threshold`` (None if the last one is not)."""
    index = None
    for i in range(len(values) - 1, -1, -1):
        if values[i] < threshold:
            index = i
        else:
            break
    return index


def emergence_point(point: dict, field: str = "examples"):
    """An emergence point's ``field`` (examples, step, flops) under its rule: the first crossing, or under
    ``rule: sustained`` the checkpoint from which the curve stays below the threshold."""
    return point["stable_" + field] if point.get("rule") == "sustained" else point[field]
