"""Edge pruning (Bhaskar et al. 2024, "Finding Transformer Circuits with Edge Pruning"), our implementation
from the paper's description, on the recall GPT-2's disentangled residual stream (:mod:`.circuits`).

Every edge (writer → reader) gets a hard-concrete (L0) gate z ∈ [0, 1] with a learned log α (Louizos et al.
2018: stretched to (−0.1, 1.1), temperature 2/3, clipped). A gated-off edge feeds its reader the writer's
output from a *corrupted* run: the same query with one token swapped to another haystack system's
(``k1`` — the recall prediction at the query's open label — swaps the label; ``k2`` — the continuation
prediction at the first resumed observation — swaps that observation). The gates minimise the squared
distance between the pruned model's prediction at the target position and the full model's, while the
expected fraction of gated-off edges is held at a target sparsity by a Lagrangian
λ₁(s − t) + λ₂(s − t)² whose multipliers are trained by gradient ascent (the target t ramps up from 0).
The circuit is the set of edges with log α > 0 (deterministic gate > ½), less edges that cannot reach the
output; it is then scored with hard 0/1 gates on held-out queries: on its own target, on the other target
(cross-ablation), under either swap.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fnabench.data.cache import content_hash
from fnabench.tasks.recall import rundir
from fnabench.tasks.recall.circuits import CircuitModel, EdgeGraph
from fnabench.tasks.recall.evaluate import load_checkpoint
from fnabench.tasks.recall.interventions import (
    SWAPS,
    TARGETS,
    SwapBatch,
    median_of_medians,
    squared_errors,
    swap_batch,
)
from fnabench.tasks.recall.run_config import ConfigError, RunConfig

#: the swap each target is pruned against: recall reads the label, continuation the observation
CORRUPTION = {"k1": "label", "k2": "observation"}
_L, _R, _BETA = -0.1, 1.1, 2.0 / 3.0
PRUNE_DIR = "prune"


@dataclass(frozen=True)
class PruneSettings:
    """How a circuit is searched for: target sparsity, optimisation, and the query sets."""

    sparsity: float
    steps: int = 1500
    lr: float = 0.05  # Adam on the gates' log α
    lambda_lr: float = 0.05  # Adam (ascent) on the Lagrange multipliers
    ramp: float = 0.5  # fraction of the steps over which the target sparsity rises from 0
    batch: int = 64
    examples: int = 32  # training queries: examples × traces
    traces: int = 32
    test_examples: int = 16  # held-out queries for the scores
    test_traces: int = 64
    init: float = 3.0  # initial log α (every gate on: P(z > 0) ≈ 0.99)
    seed: int = 0

    def validate(self) -> PruneSettings:
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if min(self.steps, self.batch, self.examples, self.traces, self.test_examples, self.test_traces) < 1:
            raise ConfigError("prune steps, batch, examples and traces must be >= 1")
        if not 0.0 <= self.ramp <= 1.0 or self.lr <= 0 or self.lambda_lr <= 0:
            raise ConfigError("prune ramp must be in [0, 1] and learning rates > 0")
        return self

    def tag(self, target: str) -> str:
        digest = content_hash(asdict(self), 8)
        return f"{target}-s{self.sparsity:g}-{digest}"


# ---------------------------------------------------------------------------------------------- gates


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0) of a hard-concrete gate: the expected density an L0 penalty counts."""
    return torch.sigmoid(log_alpha - _BETA * math.log(-_L / _R))


def sample_gates(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One reparameterised draw of the hard-concrete gates (differentiable in log α)."""
    u = torch.rand(log_alpha.shape, generator=generator).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / _BETA)
    return (s * (_R - _L) + _L).clamp(0.0, 1.0)


def deterministic_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """The gates' test-time value: the stretched, clipped sigmoid of log α."""
    return (torch.sigmoid(log_alpha) * (_R - _L) + _L).clamp(0.0, 1.0)


def live_edges(graph: EdgeGraph, kept: torch.Tensor) -> torch.Tensor:
    """``kept`` [R, W] without the edges whose reader's output reaches the read-out through no kept edge
    (removing them changes no prediction)."""
    kept = kept & graph.allowed()
    writers, readers = graph.writers, graph.readers
    live_writer = [False] * len(writers)
    live_reader = [False] * len(readers)
    live_reader[-1] = True  # out
    for w in range(len(writers) - 1, -1, -1):  # a writer is live when it feeds a live reader
        live_writer[w] = any(kept[r, w] and live_reader[r] for r in range(len(readers)))
        if w == 0:
            break
        for r, name in enumerate(readers):
            if graph.writer_of(name) == writers[w]:
                live_reader[r] = live_writer[w]
    return kept & torch.tensor(live_reader)[:, None]


# ---------------------------------------------------------------------------------------------- data


@dataclass
class TargetData:
    """A target's queries under one swap: the clean suffix from the first position a gate can change (the earlier
    of the swapped and the target position) with the clean run's keys and values before it, the corrupted
    run's writer outputs on that suffix, and the full model's and the corrupted run's predictions there."""

    target: str
    swap: str
    batch: SwapBatch
    start: int
    clean: torch.Tensor  # [N, t, dim] tokens from ``start`` on
    prefix: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [H, N, start, hd]
    corrupt: torch.Tensor  # [W, N, t, d]
    model_pred: torch.Tensor  # [N, n] at the target position
    corrupt_pred: torch.Tensor  # [N, n] the corrupted run's prediction there

    @property
    def position(self) -> int:
        """The target's position within the suffix."""
        return self.batch.positions(self.target) - self.start

    @property
    def truth(self) -> torch.Tensor:
        return self.batch.needle[:, TARGETS.index(self.target)]

    def run(self, cm: CircuitModel, mask: torch.Tensor, rows=slice(None)) -> torch.Tensor:
        """The gated model's prediction at the target position for the queries ``rows``."""
        prefix = [(k[:, rows], v[:, rows]) for k, v in self.prefix]
        pred = cm.run_masked(self.clean[rows], mask, self.corrupt[:, rows], start=self.start, prefix=prefix)
        return pred[:, self.position]


@torch.inference_mode()
def target_data(cm: CircuitModel, config: RunConfig, target: str, swap: str, examples: int, traces: int,
                seed: int) -> TargetData:
    batch = swap_batch(config, config.eval, swap, examples, traces, seed)
    pos = batch.positions(target)
    start = min(pos, batch.label_pos + SWAPS.index(swap))  # the clean and swapped queries agree before it
    clean, _, _, kv = cm.run_all(batch.clean)
    corrupt_pred, corrupt, _ = cm.run(batch.swapped)
    prefix = [(k[..., :start, :].clone(), v[..., :start, :].clone()) for k, v in kv]
    return TargetData(target, swap, batch, start, batch.clean[:, start:].clone(), prefix,
                      corrupt[:, :, start:].clone(), clean[:, pos].clone(), corrupt_pred[:, pos].clone())


# ---------------------------------------------------------------------------------------------- search


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ConfigError(f"unknown prune target {target!r}; valid: {', '.join(TARGETS)}")


def find_circuit(model, config: RunConfig, target: str, settings: PruneSettings, progress=None) -> dict:
    """Train the gates for ``target`` and return the circuit: kept edges, the training history and scores."""
    _check_target(target)
    settings.validate()
    cm = CircuitModel(model.eval())
    graph = cm.graph
    allowed = graph.allowed()
    n_edges = int(allowed.sum())
    began = time.perf_counter()
    data = target_data(cm, config, target, CORRUPTION[target], settings.examples, settings.traces,
                       seed=10_000 + settings.seed)
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    log_alpha = torch.full(allowed.shape, settings.init, requires_grad=True)
    lambdas = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([log_alpha], lr=settings.lr)
    opt_lambda = torch.optim.Adam([lambdas], lr=settings.lambda_lr, maximize=True)
    n = len(data.batch)
    history = []
    ramp_steps = max(1, int(settings.ramp * settings.steps))
    for step in range(settings.steps):
        index = torch.randint(0, n, (min(settings.batch, n),), generator=generator)
        gates = sample_gates(log_alpha, generator)
        pred = data.run(cm, gates, index)
        faithful = ((pred - data.model_pred[index]) ** 2).sum(-1).mean()
        target_sparsity = settings.sparsity * min(1.0, (step + 1) / ramp_steps)
        expected = 1.0 - keep_probability(log_alpha)[allowed].mean()
        gap = expected - target_sparsity
        lagrangian = lambdas[0] * gap + lambdas[1] * gap ** 2
        opt.zero_grad(set_to_none=True)
        opt_lambda.zero_grad(set_to_none=True)
        (faithful + lagrangian).backward()
        opt.step()
        opt_lambda.step()
        if step % 50 == 0 or step == settings.steps - 1:
            history.append({"step": step, "faithful_mse": faithful.item(), "expected_sparsity": expected.item(),
                            "target_sparsity": target_sparsity, "lambda1": lambdas[0].item(),
                            "lambda2": lambdas[1].item()})
            if progress is not None:
                progress(history[-1])
    with torch.no_grad():
        kept = live_edges(graph, (log_alpha > 0) & allowed)
    edges = [(graph.writers[w], graph.readers[r]) for r, w in kept.nonzero().tolist()]
    return {
        "target": target, "corruption": CORRUPTION[target], "settings": asdict(settings),
        "edges_total": n_edges, "edges_kept": len(edges), "sparsity": 1.0 - len(edges) / n_edges,
        "expected_sparsity": history[-1]["expected_sparsity"], "edges": [list(e) for e in edges],
        "history": history, "seconds": time.perf_counter() - began,
        "graph": {"n_layer": graph.n_layer, "n_head": graph.n_head},
    }


# ---------------------------------------------------------------------------------------------- scores


def edge_mask(graph: EdgeGraph, edges) -> torch.Tensor:
    """The [R, W] 0/1 mask of a list of (writer, reader) names."""
    w_index = {name: i for i, name in enumerate(graph.writers)}
    r_index = {name: i for i, name in enumerate(graph.readers)}
    mask = torch.zeros(len(graph.readers), len(graph.writers))
    for writer, reader in edges:
        mask[r_index[reader], w_index[writer]] = 1.0
    return mask


@torch.inference_mode()
def score(cm: CircuitModel, mask: torch.Tensor, data: TargetData, chunk: int = 256) -> dict:
    """A hard-gated circuit on one target's held-out queries: its error against the truth (median over traces,
    then examples), its mean squared distance to the full model's prediction, the full model's and the fully
    ablated (corrupted) run's errors, and the fraction of the ablation's damage the circuit recovers (None when
    the swap changes the error by less than 5 %: there is nothing to recover)."""
    pred = torch.cat([data.run(cm, mask, slice(i, i + chunk)) for i in range(0, len(data.batch), chunk)])
    example = data.batch.example
    err = median_of_medians(squared_errors(pred, data.truth), example)
    model_err = median_of_medians(squared_errors(data.model_pred, data.truth), example)
    ablated_err = median_of_medians(squared_errors(data.corrupt_pred, data.truth), example)
    damage = ablated_err - model_err
    harmless = abs(damage) <= 0.05 * max(model_err, ablated_err, 1e-12)  # nothing to recover: the ratio is noise
    return {
        "err": err, "model_err": model_err, "ablated_err": ablated_err,
        "mse_to_model": float(squared_errors(pred, data.model_pred).mean()),
        "recovered": None if harmless else (ablated_err - err) / damage,
    }


def score_circuit(model, config: RunConfig, circuit: dict, settings: PruneSettings) -> dict:
    """Scores of a circuit on every target under every swap: {target: {swap: score}}."""
    cm = CircuitModel(model.eval())
    mask = edge_mask(cm.graph, circuit["edges"])
    out: dict = {}
    for target in TARGETS:
        for swap in SWAPS:
            data = target_data(cm, config, target, swap, settings.test_examples, settings.test_traces,
                               seed=20_000 + settings.seed)
            out.setdefault(target, {})[swap] = score(cm, mask, data)
    return out


def overlap(a: dict, b: dict) -> dict:
    """Shared edges of two circuits: count, Jaccard index, and the share of the smaller one."""
    ea, eb = {tuple(e) for e in a["edges"]}, {tuple(e) for e in b["edges"]}
    shared = ea & eb
    union = ea | eb
    return {"shared": len(shared), "jaccard": len(shared) / len(union) if union else None,
            "of_smaller": len(shared) / min(len(ea), len(eb)) if ea and eb else None}


# ---------------------------------------------------------------------------------------------- runs


def prune_run(run_dir: str | Path, target: str, settings: PruneSettings, *, step: int | None = None,
              refresh: bool = False, progress=None) -> dict:
    """Find (or read back) the circuit for ``target`` at a run's checkpoint (default the last), score it, and
    store ``circuit.json`` under ``RUN/prune/<target>-s<sparsity>-<hash>/``."""
    _check_target(target)
    settings.validate()
    run_dir = Path(run_dir)
    config = rundir.load_config(run_dir)
    step, checkpoint = rundir.pick_checkpoint(run_dir, step, "prune")
    if config.eval.haystack < 2 or config.eval.query_len < 2:
        raise ConfigError("pruning needs a recall query with eval.haystack >= 2 and >= 2 observations after it")
    folder = run_dir / PRUNE_DIR / f"step{step}" / settings.tag(target)
    path = folder / "circuit.json"
    if path.is_file() and not refresh:
        return rundir.read_json(path)
    model, counters = load_checkpoint(config, checkpoint)
    circuit = find_circuit(model, config, target, settings, progress)
    circuit["scores"] = score_circuit(model, config, circuit, settings)
    circuit["step"] = step
    circuit["examples"] = counters["examples"]
    rundir.write_json(path, circuit)
    return circuit


def stored_circuits(run_dir: str | Path) -> list[tuple[Path, dict]]:
    """Every circuit stored in a run directory, (path, circuit), in path order."""
    folder = Path(run_dir) / PRUNE_DIR
    return [(p, rundir.read_json(p)) for p in sorted(folder.glob("step*/*/circuit.json"))] if folder.is_dir() else []


def summary_rows(circuits: dict[str, dict]) -> dict:
    """The comparison the report prints for a pair {k1: circuit, k2: circuit} at one sparsity."""
    out: dict = {}
    for target, circuit in circuits.items():
        other = next((t for t in TARGETS if t != target), target)
        own = circuit["scores"][target][CORRUPTION[target]]
        cross = circuit["scores"][other][CORRUPTION[other]]
        out[target] = {"edges_kept": circuit["edges_kept"], "edges_total": circuit["edges_total"],
                       "own": own, "cross": cross}
    if len(circuits) == 2:
        out["overlap"] = overlap(circuits["k1"], circuits["k2"])
    return out
