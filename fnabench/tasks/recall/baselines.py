"""Reference predictors: the zero predictor and the in-context least-squares estimate of the transition."""

from __future__ import annotations

import numpy as np


def zero_errors(states: np.ndarray) -> np.ndarray:
    """Squared error of predicting 0: ‖x‖² per state (median ≈ 0.87 for x ~ N(0, I/5))."""
    return (np.asarray(states, dtype=np.float64) ** 2).sum(axis=-1)


def least_squares_predictions(states: np.ndarray) -> np.ndarray:
    """Predict each of m consecutive states [..., m, n] from the ones before it, as Û x_{j-1} with
    Û = [x_1 … x_{j-1}][x_0 … x_{j-2}]⁺; states with no transition seen yet are predicted as 0.
    Exact for noiseless x_{t+1} = U x_t once n + 1 states (n transitions) are seen."""
    x = np.asarray(states, dtype=np.float64)
    out = np.zeros_like(x)
    for j in range(2, x.shape[-2]):
        past, future = np.swapaxes(x[..., : j - 1, :], -1, -2), np.swapaxes(x[..., 1:j, :], -1, -2)
        estimate = future @ np.linalg.pinv(past)
        out[..., j, :] = (estimate @ x[..., j - 1, :, None])[..., 0]
    return out


def least_squares_errors(states: np.ndarray) -> np.ndarray:
    """Squared error ‖Û x_{j-1} − x_j‖² of :func:`least_squares_predictions` for every state."""
    x = np.asarray(states, dtype=np.float64)
    return ((least_squares_predictions(x) - x) ** 2).sum(axis=-1)
