"""The continuous token encoding: label one-hots at √2, a start token, a payload flag and the state.

For n = 5 and 25 labels this is the paper's 57-dim layout: open label k at dim 2k, close label k at
2k+1 (value √2, so a label has about the norm of a payload token, 1 + ‖x‖² ≈ 2), start at 50,
payload flag (1) at 51, state x at 52..56.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LABEL_VALUE = float(np.sqrt(2.0))


@dataclass(frozen=True)
class TokenLayout:
    """Where each part of a token lives for ``state_dim``-dim states and ``num_labels`` label pairs."""

    state_dim: int
    num_labels: int

    @property
    def dim(self) -> int:
        return 2 * self.num_labels + 2 + self.state_dim

    @property
    def start_dim(self) -> int:
        return 2 * self.num_labels

    @property
    def flag_dim(self) -> int:
        return 2 * self.num_labels + 1

    @property
    def state_slice(self) -> slice:
        return slice(2 * self.num_labels + 2, self.dim)

    def open_dim(self, label: int) -> int:
        return 2 * label

    def close_dim(self, label: int) -> int:
        return 2 * label + 1

    def empty(self, *shape: int) -> np.ndarray:
        """All-zero tokens [*shape, dim] (float32): a pad token."""
        return np.zeros((*shape, self.dim), dtype=np.float32)

    def put_start(self, tokens: np.ndarray, pos) -> None:
        tokens[..., pos, self.start_dim] = LABEL_VALUE

    def put_open(self, tokens: np.ndarray, pos, label) -> None:
        """Write open label(s) at ``pos``; ``label`` may be an array broadcasting over the leading dims."""
        _put_label(tokens, pos, 2 * np.asarray(label))

    def put_close(self, tokens: np.ndarray, pos, label) -> None:
        _put_label(tokens, pos, 2 * np.asarray(label) + 1)

    def put_states(self, tokens: np.ndarray, start: int, states: np.ndarray) -> None:
        """Write payload tokens for ``states`` [..., m, n] at positions start..start+m-1."""
        m = states.shape[-2]
        tokens[..., start:start + m, self.flag_dim] = 1.0
        tokens[..., start:start + m, self.state_slice] = states

    def states(self, tokens: np.ndarray) -> np.ndarray:
        return tokens[..., self.state_slice]

    def is_payload(self, tokens: np.ndarray) -> np.ndarray:
        return tokens[..., self.flag_dim] == 1.0


def _put_label(tokens: np.ndarray, pos, dims: np.ndarray) -> None:
    if dims.ndim == 0:
        tokens[..., pos, int(dims)] = LABEL_VALUE
        return
    lead = tokens.shape[:-2]
    dims = np.broadcast_to(dims, lead)
    index = np.indices(lead)
    tokens[(*index, np.full(lead, pos), dims)] = LABEL_VALUE
