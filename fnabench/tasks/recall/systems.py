"""Linear dynamical systems: Haar-random orthogonal (and ident / ortho / noisy gauss) families, simulation, corpora."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fnabench.tasks.recall.run_config import ConfigError, DataConfig


def haar_orthogonal(n: int, count: int, rng: np.random.Generator, sign_fix: bool = True) -> np.ndarray:
    """``count`` matrices in O(n): QR of i.i.d. N(0, 1) matrices, Q·diag(sign(diag R)) so Q is Haar-distributed."""
    q, r = np.linalg.qr(rng.standard_normal((count, n, n)))
    if sign_fix:
        signs = np.sign(np.diagonal(r, axis1=-2, axis2=-1))
        signs[signs == 0] = 1.0
        q = q * signs[:, None, :]
    return q


def _gauss_systems(n: int, hidden: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random stable A (Gaussian entries rescaled to spectral radius 0.95) and Gaussian C with E‖C x₀‖² = 1."""
    a = rng.normal(0.0, np.sqrt(0.33), (count, hidden, hidden))
    radius = np.abs(np.linalg.eigvals(a)).max(axis=-1)
    a = a * (0.95 / radius)[:, None, None]
    c = rng.standard_normal((count, n, hidden))
    c = c / np.sqrt((c**2).sum(axis=(1, 2)) / hidden)[:, None, None]
    return a, c


@dataclass
class Systems:
    """A set of systems x_{t+1} = A x_t + w, y_t = C x_t + v (C = None: y = x); noise N(0, noise_std²)."""

    family: str
    A: np.ndarray  # [S, h, h]
    C: np.ndarray | None  # [S, n, h] or None
    noise_std: float = 0.0

    def __len__(self) -> int:
        return self.A.shape[0]

    @property
    def hidden_dim(self) -> int:
        return self.A.shape[-1]

    def initial_states(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """x₀ ~ N(0, I/h) for every entry of ``shape``: E‖x₀‖² = 1."""
        h = self.hidden_dim
        return rng.standard_normal((*shape, h)) / np.sqrt(h)

    def simulate(self, idx: np.ndarray, x0: np.ndarray, steps: int, rng: np.random.Generator | None = None
                 ) -> np.ndarray:
        """Observations y_0..y_{steps-1} [..., steps, n] of systems ``idx`` (broadcast against x0[..., 0])."""
        a = self.A[idx]
        c = None if self.C is None else self.C[idx]
        noisy = self.noise_std > 0
        if noisy and rng is None:
            raise ValueError("a noisy family needs an rng to simulate")
        x = np.asarray(x0, dtype=np.float64)
        out = []
        for _ in range(steps):
            y = x if c is None else (c @ x[..., None])[..., 0]
            if noisy:
                y = y + self.noise_std * rng.standard_normal(y.shape)
            out.append(y)
            x = (a @ x[..., None])[..., 0]
            if noisy:
                x = x + self.noise_std * rng.standard_normal(x.shape)
        return np.stack(out, axis=-2)

    def through(self, idx: np.ndarray, v: np.ndarray, at: int) -> np.ndarray:
        """x₀ such that x_at = v (noiseless, C = I only): x₀ = A^{-at} v, the synchronized-observation probe."""
        if self.C is not None or self.noise_std > 0:
            raise ConfigError(f"the sync probe needs a noiseless, fully observed family, not {self.family!r}")
        inverse = np.linalg.inv(self.A[idx])
        x = np.asarray(v, dtype=np.float64)
        for _ in range(at):
            x = (inverse @ x[..., None])[..., 0]
        return x


def make_systems(family: str, n: int, count: int, rng: np.random.Generator, *, noise_std: float = 0.0,
                 hidden_dim: int = 0) -> Systems:
    """``count`` systems of a family: ortho_haar (Haar O(n)), ortho (QR without sign fix), ident, gauss."""
    if family == "ortho_haar":
        return Systems(family, haar_orthogonal(n, count, rng), None, noise_std)
    if family == "ortho":
        return Systems(family, haar_orthogonal(n, count, rng, sign_fix=False), None, noise_std)
    if family == "ident":
        return Systems(family, np.broadcast_to(np.eye(n), (count, n, n)).copy(), None, noise_std)
    if family == "gauss":
        a, c = _gauss_systems(n, hidden_dim or 2 * n, count, rng)
        return Systems(family, a, c, noise_std)
    raise ConfigError(f"unknown family {family!r}; valid: ortho_haar, ortho, ident, gauss")


@dataclass
class Corpus:
    """The fixed training systems with one stored trajectory each, and disjoint validation systems."""

    train: Systems
    train_traces: np.ndarray  # [S, T, n] float32
    val: Systems


@functools.lru_cache(maxsize=4)
def make_corpus(data: DataConfig) -> Corpus:
    """Build (and cache per process) the corpus that ``data`` describes; the same config gives the same corpus."""
    kwargs = {"noise_std": data.noise_std, "hidden_dim": data.hidden_dim}
    train_rng = np.random.default_rng([data.corpus_seed, 0])
    train = make_systems(data.family, data.state_dim, data.train_systems, train_rng, **kwargs)
    x0 = train.initial_states((len(train),), train_rng)
    traces = train.simulate(np.arange(len(train)), x0, data.states_per_trace, train_rng).astype(np.float32)
    val = make_systems(data.family, data.state_dim, data.val_systems, np.random.default_rng([data.corpus_seed, 1]),
                       **kwargs)
    return Corpus(train, traces, val)
