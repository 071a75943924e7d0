"""Recall queries ("needle in a haystack") and their out-of-distribution probes.

Layout, with s observations per haystack segment and q after the query label (H systems):
``[start] [open_1 x_0..x_{s-1} close_1] … [open_H … close_H] [open_c x_s .. x_{s+q-1}]`` — the query
re-opens haystack system c (the needle, c = 0 by default: farthest back) and continues its trajectory.
Length 1 + H(s+2) + 1 + q (12(H+1) for s = q = 10); the final open label sits at 1 + H(s+2).

Probes change only the query: ``misdirected`` opens it with the label of the next haystack system while
the payload continues the needle; ``sync`` makes every haystack trajectory pass through one shared state
where the query resumes (so the first resumed observation says nothing about which system it is);
``unseen_label`` opens it with a label absent from the context; ``unseen_system`` uses an absent label
and a fresh system's trajectory from its start.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from fnabench.tasks.recall.run_config import PROBES, ConfigError, DataConfig, EvalConfig
from fnabench.tasks.recall.systems import Systems
from fnabench.tasks.recall.tokens import TokenLayout


@dataclass
class QueryExample:
    """One haystack example: R traces that share systems and labels and differ in their initial states."""

    tokens: np.ndarray  # [R, L, dim] float32
    systems: np.ndarray  # [H + 1] validation-system indices (the last one: the fresh system)
    labels: np.ndarray  # [H + 1] label ids (the last one: unseen in the context)
    final_open: int  # position of the query's open label
    needle_open: int  # position of the needle's first open label
    history: np.ndarray  # [R, m, n] the query payload system's states as the context shows them, in order
    history_offset: int  # index in ``history`` of the first observation after the query label
    needle_states: np.ndarray  # [R, s, n] the needle's haystack segment
    query_label: int
    states: np.ndarray | None = None  # [R, H + 1, s + q, n] every drawn system's trajectory (interventions)


def layout_positions(cfg: EvalConfig) -> tuple[list[int], int]:
    """Positions of the haystack open labels and of the query's open label."""
    step = cfg.segment_obs + 2
    return [1 + j * step for j in range(cfg.haystack)], 1 + cfg.haystack * step


def build_example(systems: Systems, cfg: EvalConfig, layout: TokenLayout, rng: np.random.Generator,
                  probe: str = "none", traces: int | None = None) -> QueryExample:
    """Draw one haystack example (systems, labels, initial states) from ``rng`` and lay out its query."""
    if probe not in PROBES:
        raise ConfigError(f"unknown probe {probe!r}; valid: {', '.join(PROBES)}")
    if probe == "misdirected" and cfg.haystack < 2:
        raise ConfigError("the misdirected probe needs eval.haystack >= 2")
    h, s, q, c = cfg.haystack, cfg.segment_obs, cfg.query_len, cfg.needle
    r = cfg.traces if traces is None else traces
    # every probe draws the same numbers in the same order, so probes share their haystacks
    chosen = rng.choice(len(systems), size=h + 1, replace=False)
    labels = rng.permutation(layout.num_labels)[: h + 1]
    x0 = systems.initial_states((r, h + 1), rng)
    shared = systems.initial_states((r, 1), rng)
    sim_rng = np.random.default_rng(rng.integers(2**63))
    if probe == "sync":
        x0[:, :h] = systems.through(chosen[None, :h], shared, at=s)
    states = systems.simulate(chosen[None, :], x0, s + q, sim_rng).astype(np.float32)  # [R, H+1, s+q, n]

    tokens = layout.empty(r, cfg.seq_len)
    layout.put_start(tokens, 0)
    opens, final_open = layout_positions(cfg)
    for j, pos in enumerate(opens):
        layout.put_open(tokens, pos, labels[j])
        layout.put_states(tokens, pos + 1, states[:, j, :s])
        layout.put_close(tokens, pos + s + 1, labels[j])
    query_label = {"misdirected": labels[(c + 1) % h], "unseen_label": labels[h],
                   "unseen_system": labels[h]}.get(probe, labels[c])
    if probe == "unseen_system":
        history, offset = states[:, h, :q], 0
    else:
        history, offset = states[:, c, : s + q], s
    layout.put_open(tokens, final_open, query_label)
    layout.put_states(tokens, final_open + 1, history[:, offset:])
    return QueryExample(tokens, chosen, labels, final_open, opens[c], history, offset, states[:, c, :s],
                        int(query_label), states)


def iter_examples(systems: Systems, data: DataConfig, cfg: EvalConfig, probe: str = "none",
                  examples: int | None = None, traces: int | None = None) -> Iterator[QueryExample]:
    """The evaluation set: ``cfg.examples`` haystack examples, the same for every checkpoint and probe."""
    layout = TokenLayout(data.state_dim, data.num_labels)
    for e in range(cfg.examples if examples is None else examples):
        yield build_example(systems, cfg, layout, np.random.default_rng([cfg.seed, e]), probe, traces)
