"""Interventions that separate the two mechanisms: token swaps on the recall query, and activation patching.

A *swap* changes one token of the query to the one another haystack system (the next one in the cycle,
the *other* system) would give: ``label`` opens the query with the other system's label (the misdirected
probe) and ``observation`` replaces the first resumed observation with the other system's state at that
point. Recall (k = 1, predicted at the open label) reads the label; continuation (k = 2, predicted at the
first resumed observation) can read the observation.

*Activation patching* (the token-swap test, per layer) takes the swapped token from *another configuration*:
a donor query with other systems and states but the same label in every haystack slot, which re-opens the
other system's slot. Its residual stream at the swapped position, where layer l reads it, is written into the
clean run at that position. At layer 0 that is the swapped token itself (the prediction follows the clean
context's other system, if the position's mechanism reads the token); at the read-out it is the donor's own
prediction (it follows the donor's system). The layer where the patched prediction moves from the one to the
other is where that position has gathered what it predicts from the context; the later position (k = 2 for a
label patch) shows whether continuation reads the label position at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from fnabench.tasks.recall import rundir
from fnabench.tasks.recall.circuits import CircuitModel
from fnabench.tasks.recall.evaluate import load_checkpoint
from fnabench.tasks.recall.queries import QueryExample, build_example, layout_positions
from fnabench.tasks.recall.run_config import ConfigError, EvalConfig, RunConfig, section_dict
from fnabench.tasks.recall.systems import make_corpus
from fnabench.tasks.recall.tokens import TokenLayout

SWAPS = ("label", "observation")
TARGETS = ("k1", "k2")
#: whose state each error is measured against: the clean query's needle and other system, the donor's system
WHOSE = ("needle", "other", "donor")


@dataclass
class SwapBatch:
    """Clean, swapped and donor queries (cut after the first resumed observation) and the answers at k = 1, 2.

    ``needle`` / ``other`` / ``donor_truth`` [N, 2, n]: the needle's and the other system's states at k = 1 and
    k = 2 after the query label, and the donor query's; ``example`` [N]: which haystack example each row comes
    from (for medians over traces)."""

    clean: torch.Tensor
    swapped: torch.Tensor
    needle: torch.Tensor
    other: torch.Tensor
    example: np.ndarray
    label_pos: int
    donor: torch.Tensor | None = None
    donor_truth: torch.Tensor | None = None

    def positions(self, target: str) -> int:
        """The position whose prediction is the target's (k1: at the open label; k2: at the first observation)."""
        return self.label_pos + TARGETS.index(target)

    def rows(self, index) -> SwapBatch:
        def pick(t):
            return None if t is None else t[index]

        return SwapBatch(self.clean[index], self.swapped[index], self.needle[index], self.other[index],
                         self.example[index], self.label_pos, pick(self.donor), pick(self.donor_truth))

    def truth(self, whose: str) -> torch.Tensor:
        return {"needle": self.needle, "other": self.other, "donor": self.donor_truth}[whose]

    def __len__(self) -> int:
        return self.clean.shape[0]


def relabel(example: QueryExample, cfg: EvalConfig, layout: TokenLayout, labels: np.ndarray, query_slot: int
            ) -> np.ndarray:
    """The example's tokens with haystack slot j labelled ``labels[j]`` and the query opened with
    ``labels[query_slot]``."""
    tokens = example.tokens.copy()
    opens, final_open = layout_positions(cfg)
    label_dims = slice(0, 2 * layout.num_labels)
    for j, pos in enumerate(opens):
        for at, put in ((pos, layout.put_open), (pos + cfg.segment_obs + 1, layout.put_close)):
            tokens[:, at, label_dims] = 0.0
            put(tokens, at, labels[j])
    tokens[:, final_open, label_dims] = 0.0
    layout.put_open(tokens, final_open, labels[query_slot])
    return tokens


def swap_tokens(example: QueryExample, cfg: EvalConfig, layout: TokenLayout, swap: str) -> np.ndarray:
    """A copy of the example's tokens with the label or the first resumed observation swapped to the other's."""
    if swap not in SWAPS:
        raise ConfigError(f"unknown swap {swap!r}; valid: {', '.join(SWAPS)}")
    if cfg.haystack < 2:
        raise ConfigError("token swaps need eval.haystack >= 2 (another system to swap with)")
    other = (cfg.needle + 1) % cfg.haystack
    tokens = example.tokens.copy()
    pos = example.final_open
    if swap == "label":
        tokens[:, pos, : 2 * layout.num_labels] = 0.0
        layout.put_open(tokens, pos, example.labels[other])
    else:
        tokens[:, pos + 1, layout.state_slice] = example.states[:, other, cfg.segment_obs]
    return tokens


def swap_batch(config: RunConfig, cfg: EvalConfig, swap: str, examples: int, traces: int, seed: int,
               donors: bool = False) -> SwapBatch:
    """``examples`` × ``traces`` clean/swapped query pairs on the validation systems, drawn from ``seed``
    (distinct seeds give disjoint draws; the evaluation's own queries use ``eval.seed``); ``donors`` adds a
    donor query from another configuration for each (module docstring)."""
    if cfg.query_len < 2:
        raise ConfigError("token swaps need at least 2 observations after the query label (eval.query_obs)")
    layout = TokenLayout(config.data.state_dim, config.data.num_labels)
    systems = make_corpus(config.data).val
    other = (cfg.needle + 1) % cfg.haystack
    s = cfg.segment_obs
    parts: dict[str, list] = {"clean": [], "swapped": [], "needle": [], "other": [], "example": [], "donor": [],
                              "donor_truth": []}
    label_pos = 0
    for e in range(examples):
        ex = build_example(systems, cfg, layout, np.random.default_rng([seed, e]), traces=traces)
        cut = ex.final_open + 2  # inputs up to the first resumed observation
        parts["clean"].append(ex.tokens[:, :cut])
        parts["swapped"].append(swap_tokens(ex, cfg, layout, swap)[:, :cut])
        parts["needle"].append(ex.states[:, cfg.needle, s:s + 2])
        parts["other"].append(ex.states[:, other, s:s + 2])
        parts["example"].append(np.full(traces, e))
        if donors:
            donor = build_example(systems, replace(cfg, needle=other), layout,
                                  np.random.default_rng([seed, 1_000_003, e]), traces=traces)
            parts["donor"].append(relabel(donor, cfg, layout, ex.labels, other)[:, :cut])
            parts["donor_truth"].append(donor.states[:, other, s:s + 2])
        label_pos = ex.final_open
    cat = {k: np.concatenate(v) for k, v in parts.items() if v}

    def tensor(k):
        return torch.from_numpy(np.ascontiguousarray(cat[k])).float() if k in cat else None

    return SwapBatch(tensor("clean"), tensor("swapped"), tensor("needle"), tensor("other"), cat["example"],
                     label_pos, tensor("donor"), tensor("donor_truth"))


def squared_errors(pred: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """‖pred − truth‖² per row, as float64 numpy."""
    return ((pred.double() - truth.double()) ** 2).sum(-1).numpy()


def median_of_medians(values: np.ndarray, example: np.ndarray) -> float:
    """The suite's aggregate: median over each example's traces, then median over examples."""
    return float(np.median([np.median(values[example == e]) for e in np.unique(example)]))


@torch.inference_mode()
def token_swap_patching(circuit_model, batch: SwapBatch, position: int, chunk: int = 512) -> list[dict]:
    """Per layer l = 0..L (the residual stream where layer l reads it; L: before the read-out), the clean run
    with the donor run's residual written in at ``position``: errors at k = 1 and 2 against the needle's, the
    other system's and the donor's states. Reference rows first: ``clean`` (no patch), ``swapped`` (the clean
    context with the swapped token) and ``donor`` (the donor run). Medians over traces, then over examples."""
    preds: dict[str, list[torch.Tensor]] = {}
    n_layer = circuit_model.n_layer
    names = ["clean", "swapped", "donor", *[f"l{layer}" for layer in range(n_layer + 1)]]
    for start in range(0, len(batch), chunk):
        part = batch.rows(slice(start, start + chunk))
        runs = {"clean": circuit_model.run(part.clean)[0], "swapped": circuit_model.run(part.swapped)[0]}
        runs["donor"], _, residuals = circuit_model.run(part.donor)
        for layer in range(n_layer + 1):
            runs[f"l{layer}"], _, _ = circuit_model.run(part.clean, {layer: (position, residuals[layer][:, position])})
        for name in names:
            preds.setdefault(name, []).append(runs[name][:, batch.label_pos:batch.label_pos + 2])
    rows = []
    for name in names:
        pred = torch.cat(preds[name])  # [N, 2, n]
        row: dict = {"layer": name}
        for j, k in enumerate(TARGETS):
            for whose in WHOSE:
                truth = batch.truth(whose)[:, j]
                row[f"{k}_{whose}"] = median_of_medians(squared_errors(pred[:, j], truth), batch.example)
        rows.append(row)
    return rows


def patching_report(model, config: RunConfig, cfg: EvalConfig, examples: int = 16, traces: int = 64,
                    swaps: Sequence[str] = SWAPS) -> dict[str, list[dict]]:
    """:func:`token_swap_patching` at the swapped position for each swap (label: the query's open label;
    observation: the first resumed observation) on ``examples`` × ``traces`` queries drawn as the evaluation's."""
    circuit_model = CircuitModel(model.eval())
    out = {}
    for swap in swaps:
        batch = swap_batch(config, cfg, swap, examples, traces, cfg.seed, donors=True)
        out[swap] = token_swap_patching(circuit_model, batch, batch.label_pos + SWAPS.index(swap))
    return out


PATCHING_DIR = "patching"
#: stored patching results of another layout (before donor queries) are measured again
PATCHING_FORMAT = 2


def patch_run(run_dir, examples: int | None = None, traces: int | None = None, step: int | None = None,
              refresh: bool = False) -> dict:
    """:func:`patching_report` at a run's checkpoint (default the last), stored as ``RUN/eval/patching/step_N.json``
    ({"step", "examples_trained", "examples", "traces", "eval", "rows": {swap: rows}}) and read back when it
    matches (``examples`` / ``traces`` None: whatever is stored, else 16 × 64)."""
    from pathlib import Path


    run_dir = Path(run_dir)
    config = rundir.load_config(run_dir)
    step, checkpoint = rundir.pick_checkpoint(run_dir, step, "patch")
    if min(examples or 1, traces or 1) < 1:
        raise ConfigError("patching --examples and --traces must be >= 1")
    path = run_dir / rundir.EVALS / PATCHING_DIR / f"step_{step:08d}.json"
    if path.is_file() and not refresh:
        stored = rundir.read_json(path)
        if stored.get("format") == PATCHING_FORMAT and stored.get("eval") == section_dict(config.eval) \
                and examples in (None, stored["examples"]) and traces in (None, stored["traces"]):
            return stored
    examples, traces = examples or 16, traces or 64
    model, counters = load_checkpoint(config, checkpoint)
    out = {"format": PATCHING_FORMAT, "step": step, "examples_trained": counters["examples"], "examples": examples,
           "traces": traces,
           "eval": section_dict(config.eval), "rows": patching_report(model, config, config.eval, examples, traces)}
    rundir.write_json(path, out)
    return out


def stored_patching(run_dir) -> list[dict]:
    """Every patching result stored in a run directory, in file order."""
    from pathlib import Path


    folder = Path(run_dir) / rundir.EVALS / PATCHING_DIR
    stored = [rundir.read_json(p) for p in sorted(folder.glob("step_*.json"))] if folder.is_dir() else []
    return [s for s in stored if s.get("format") == PATCHING_FORMAT]
