"""Training traces: several systems interleaved in segments bracketed by their (per-trace permuted) labels.

One trace: N ~ Zipf(a) on 1..max_systems distinct systems from the fixed corpus, labels assigned by a
random permutation, Poisson(2N) cuts at uniform positions, and each segment ``[open_k, states…, close_k]``
continuing its system's trajectory where that system's previous segment stopped. Drawn fresh every example.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from fnabench.tasks.recall.run_config import DataConfig
from fnabench.tasks.recall.systems import Corpus
from fnabench.tasks.recall.tokens import TokenLayout


@dataclass
class Segment:
    """One segment of a trace: its system, label, where its first token sits and which states it carries."""

    system: int  # index into the training corpus
    label: int
    start: int  # position of its first token (the open label, or a lone close label)
    first_state: int  # trajectory index of its first observation
    n_obs: int
    opened: bool = True
    closed: bool = True


@dataclass
class Trace:
    """A sampled training trace: tokens [context, dim] and how they were made."""

    tokens: np.ndarray
    systems: list[int]
    labels: dict[int, int]
    cuts: np.ndarray
    segments: list[Segment] = field(default_factory=list)


def zipf_pmf(cap: int, a: float) -> np.ndarray:
    """P(N = k) ∝ k^-a on k = 1..cap (scipy's ``zipfian(a, cap)``)."""
    weights = np.arange(1, cap + 1, dtype=np.float64) ** -a
    return weights / weights.sum()


@functools.lru_cache(maxsize=8)
def _zipf_cdf(cap: int, a: float) -> np.ndarray:
    return np.cumsum(zipf_pmf(cap, a))


def sample_num_systems(rng: np.random.Generator, cap: int, a: float) -> int:
    """N ~ Zipf(a) truncated to 1..cap (inverse-CDF draw)."""
    return min(int(np.searchsorted(_zipf_cdf(cap, a), rng.random(), side="right")), cap - 1) + 1


def sample_cut_count(rng: np.random.Generator, num_systems: int, data: DataConfig) -> int:
    """Number of cuts ~ Poisson(cuts_per_system · N), capped at (context - 1) // 2."""
    return min(int(rng.poisson(data.cuts_per_system * num_systems)), data.max_cuts)


def sample_cuts(rng: np.random.Generator, num_systems: int, data: DataConfig) -> np.ndarray:
    """Sorted cut positions in [0, context-1]: uniform draws on [0, context-1) (duplicates kept; a drawn 0
    is the start cut), plus 0 and context-1."""
    span = data.context - 1
    cuts = rng.integers(0, span, size=sample_cut_count(rng, num_systems, data))
    if 0 not in cuts:
        cuts = np.append(cuts, 0)
    return np.sort(np.append(cuts, span))


def sample_trace(corpus: Corpus, data: DataConfig, layout: TokenLayout, rng: np.random.Generator,
                 out: np.ndarray | None = None, record: bool = True) -> Trace:
    """Draw one training trace (into ``out`` [context, dim] if given); ``record`` keeps its segments."""
    tokens = layout.empty(data.context) if out is None else out
    num = sample_num_systems(rng, data.systems_cap, data.zipf_a)
    systems = rng.choice(len(corpus.train), size=num, replace=False).tolist()
    permutation = rng.permutation(data.num_labels)
    labels = {s: int(permutation[i]) for i, s in enumerate(systems)}
    cuts = sample_cuts(rng, num, data)
    lengths = np.diff(cuts)
    picks = rng.integers(0, num, size=len(lengths))
    pointer = dict.fromkeys(systems, 0)
    trace_len = data.states_per_trace
    context = data.context
    trace = Trace(tokens, systems, labels, cuts)
    layout.put_start(tokens, 0)
    pos = 1
    for length, pick in zip(lengths.tolist(), picks.tolist(), strict=True):
        if length == 0 or pos >= context:
            continue
        system = systems[pick]
        label = labels[system]
        if length == 1:  # two adjacent cuts: a lone close label
            layout.put_close(tokens, pos, label)
            if record:
                trace.segments.append(Segment(system, label, pos, pointer[system], 0, opened=False))
            pos += 1
            continue
        n_obs = length - 2
        begin = pointer[system]
        if n_obs > 0:
            if begin >= trace_len:  # this system's trajectory is used up: skip the segment
                continue
            n_obs = min(n_obs, trace_len - begin)
        n_obs = min(n_obs, context - pos - 1)
        layout.put_open(tokens, pos, label)
        layout.put_states(tokens, pos + 1, corpus.train_traces[system, begin:begin + n_obs])
        closed = pos + n_obs + 1 < context
        if closed:
            layout.put_close(tokens, pos + n_obs + 1, label)
        if record:
            trace.segments.append(Segment(system, label, pos, begin, n_obs, closed=closed))
        pointer[system] = begin + n_obs
        pos += n_obs + 1 + int(closed)
    return trace


def sample_batch(corpus: Corpus, data: DataConfig, layout: TokenLayout, batch: int, rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    """A training batch: ``inputs`` [B, context-1, dim], ``targets`` [B, context-1, n], ``mask`` [B, context-1]."""
    tokens = layout.empty(batch, data.context)
    for b in range(batch):
        sample_trace(corpus, data, layout, rng, out=tokens[b], record=False)
    return split_targets(tokens, layout)


def split_targets(tokens: np.ndarray, layout: TokenLayout) -> dict[str, np.ndarray]:
    """Inputs are tokens 0..T-2; targets the states of tokens 1..T-1; the mask keeps payload targets only."""
    return {
        "inputs": tokens[..., :-1, :],
        "targets": layout.states(tokens[..., 1:, :]),
        "mask": layout.is_payload(tokens[..., 1:, :]),
    }
