"""Edge pruning and token-swap patching: the disentangled model is the model, sparsity 0 keeps it exactly, the
Lagrangian reaches its target, dead edges change nothing, patching at the first and last layer is what it must be,
and both reach the report through records."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fnabench.tasks.recall import rundir
from fnabench.tasks.recall.circuits import CircuitModel, EdgeGraph
from fnabench.tasks.recall.evaluate import load_checkpoint
from fnabench.tasks.recall.interventions import patch_run, swap_batch, token_swap_patching
from fnabench.tasks.recall.network import build_model
from fnabench.tasks.recall.presets import get_preset
from fnabench.tasks.recall.prune import (
    PruneSettings,
    edge_mask,
    find_circuit,
    keep_probability,
    live_edges,
    prune_run,
    sample_gates,
)
from fnabench.tasks.recall.run_config import ConfigError

pytest.importorskip("transformers")

FAST = {"steps": 60, "examples": 4, "traces": 8, "test_examples": 3, "test_traces": 8, "batch": 16}


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from fnabench.tasks.recall.training import train

    out = tmp_path_factory.mktemp("circuits") / "smoke"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    train(out, get_preset("smoke"), progress=False)
    torch.set_num_threads(previous)
    return out


def _model(seed: int = 0):
    config = replace(get_preset("smoke"), model=replace(get_preset("smoke").model, n_layer=3, n_head=2))
    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # away from GPT-2's near-zero init, so every term matters
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_edge_graph_counts_every_writer_before_each_reader():
    g = EdgeGraph(n_layer=4, n_head=4)
    assert len(g.writers) == 21 and len(g.readers) == 4 * 13 + 1
    # layer l's 12 q/k/v readers see 1 + 5l writers, its MLP 1 + 5l + 4, the read-out all 21
    assert len(g.edges()) == sum(12 * (1 + 5 * layer) + (5 + 5 * layer) for layer in range(4)) + 21 == 479
    assert ("a0.h1", "m0") in g.edges() and ("m0", "a0.h1.q") not in g.edges()
    assert g.writer_of("a2.h3.k") == "a2.h3" and g.writer_of("m1") == "m1" and g.writer_of("out") is None


def test_disentangled_model_is_the_model_and_masks_interpolate_between_runs():
    model = _model()
    cm = CircuitModel(model)
    clean, other = torch.randn(2, 3, 20, model.read_in.in_features).unbind(0)
    with torch.no_grad():
        reference, reference_other = model(clean), model(other)
        pred, writers, residuals = cm.run(clean)
        _, corrupt, _ = cm.run(other)
        ones = torch.ones(len(cm.graph.readers), len(cm.graph.writers))
        assert (pred - reference).abs().max() < 1e-5
        assert writers.shape == (len(cm.graph.writers), 3, 20, model.backbone.config.n_embd) and len(residuals) == 4
        assert (cm.run_masked(clean, ones, corrupt) - reference).abs().max() < 1e-5  # every edge on
        assert (cm.run_masked(clean, 0 * ones, corrupt) - reference_other).abs().max() < 1e-5  # every edge off
        # an edge that does not exist is ignored; a real one matters
        bogus = ones.clone()
        bogus[cm.graph.attention_readers(0), 5] = 0.0  # layer-0 heads cannot see writer 5
        assert (cm.run_masked(clean, bogus, corrupt) - reference).abs().max() < 1e-5
        off = ones.clone()
        off[-1, 0] = 0.0  # read-out ← embedding
        assert (cm.run_masked(clean, off, corrupt) - reference).abs().max() > 1e-3
        # causal: a change at the last position changes no earlier prediction, whatever the mask
        changed = clean.clone()
        changed[:, -1] += 1.0
        half = (torch.rand_like(ones) > 0.5).float()
        a, b = cm.run_masked(clean, half, corrupt), cm.run_masked(changed, half, corrupt)
        assert (a[:, :-1] - b[:, :-1]).abs().max() == 0


def test_masked_runs_can_start_where_the_clean_and_corrupted_inputs_part():
    model = _model(2)
    cm = CircuitModel(model)
    clean = torch.randn(3, 24, model.read_in.in_features)
    other = clean.clone()
    other[:, 15:] = torch.randn(3, 9, clean.shape[-1])  # the runs part at position 15
    with torch.no_grad():
        _, corrupt, _ = cm.run(other)
        prefix = cm.keys_values(clean)
        mask = (torch.rand(len(cm.graph.readers), len(cm.graph.writers), generator=torch.Generator().manual_seed(0))
                > 0.5).float()
        full = cm.run_masked(clean, mask, corrupt)
        for start in (1, 9, 15):
            part = cm.run_masked(clean[:, start:], mask, corrupt[:, :, start:], start=start, prefix=prefix)
            assert (part - full[:, start:]).abs().max() < 1e-5
        late = cm.run_masked(clean[:, 20:], mask, corrupt[:, :, 20:], start=20, prefix=prefix)
        assert (late - full[:, 20:]).abs().max() > 1e-4  # past the parting point the prefix is not shared
        with pytest.raises(ValueError, match="needs the clean run's keys and values"):
            cm.run_masked(clean[:, 5:], mask, corrupt[:, :, 5:], start=5)


def test_dead_edges_change_no_prediction():
    model = _model(1)
    cm = CircuitModel(model)
    clean, other = torch.randn(2, 2, 16, model.read_in.in_features).unbind(0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        _, corrupt, _ = cm.run(other)
        for _ in range(5):
            kept = (torch.rand(len(cm.graph.readers), len(cm.graph.writers), generator=generator) > 0.6)
            kept &= cm.graph.allowed()
            live = live_edges(cm.graph, kept)
            assert live.sum() < kept.sum() or kept.sum() == 0
            assert torch.equal(cm.run_masked(clean, kept.float(), corrupt), cm.run_masked(clean, live.float(), corrupt))


def test_hard_concrete_gates_match_their_keep_probability():
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])
    draws = torch.stack([sample_gates(log_alpha, torch.Generator().manual_seed(i)) for i in range(4000)])
    assert draws.min() >= 0 and draws.max() <= 1 and (draws == 0).any() and (draws == 1).any()
    assert torch.allclose((draws > 0).float().mean(0), keep_probability(log_alpha), atol=0.03)


def test_sparsity_zero_keeps_the_whole_model_exactly(run_dir):
    circuit = prune_run(run_dir, "k1", PruneSettings(sparsity=0.0, **FAST))
    assert circuit["edges_kept"] == circuit["edges_total"] == len(EdgeGraph(2, 2).edges()) and circuit["sparsity"] == 0
    for target in ("k1", "k2"):
        for swap in ("label", "observation"):
            score = circuit["scores"][target][swap]
            assert score["mse_to_model"] < 1e-10 and score["err"] == pytest.approx(score["model_err"], rel=1e-5)
    assert (run_dir / "prune").is_dir() and prune_run(run_dir, "k1", PruneSettings(sparsity=0.0, **FAST)) == circuit


def test_the_lagrangian_reaches_the_target_sparsity(run_dir):
    config = rundir.load_config(run_dir)
    model, _ = load_checkpoint(config, rundir.list_checkpoints(run_dir)[-1][1])
    settings = PruneSettings(sparsity=0.7, **{**FAST, "steps": 300, "lr": 0.1, "lambda_lr": 0.1})
    circuit = find_circuit(model, config, "k2", settings)
    assert abs(circuit["expected_sparsity"] - 0.7) < 0.08
    assert 0.5 < circuit["sparsity"] < 0.95 and circuit["history"][-1]["target_sparsity"] == pytest.approx(0.7)
    cm = CircuitModel(model)
    assert edge_mask(cm.graph, circuit["edges"]).sum() == circuit["edges_kept"]
    with pytest.raises(ConfigError, match="unknown prune target"):
        find_circuit(model, config, "k3", settings)
    with pytest.raises(ConfigError, match="sparsity must be in"):
        PruneSettings(sparsity=1.0).validate()


def test_patching_at_the_first_and_last_layer(run_dir):
    config = rundir.load_config(run_dir)
    model, _ = load_checkpoint(config, rundir.list_checkpoints(run_dir)[-1][1])
    cm = CircuitModel(model)
    batch = swap_batch(config, config.eval, "label", 3, 8, seed=5, donors=True)
    pos = batch.label_pos
    assert torch.equal(batch.clean[:, :pos], batch.swapped[:, :pos])
    assert not torch.equal(batch.clean[:, pos], batch.swapped[:, pos])
    # the donor: another configuration, the same labels slot by slot, its query opening the other slot
    assert torch.equal(batch.donor[:, pos], batch.swapped[:, pos]) and not torch.equal(batch.donor, batch.swapped)
    label_dims = slice(0, 2 * config.data.num_labels)
    assert torch.equal(batch.donor[:, :pos, label_dims], batch.clean[:, :pos, label_dims])
    rows = {r["layer"]: r for r in token_swap_patching(cm, batch, pos)}
    last = f"l{config.model.n_layer}"
    for key in ("k1_needle", "k1_other", "k1_donor", "k2_needle", "k2_other"):
        # at layer 0 the patch *is* the swapped token (the same label): the patched run is the swapped run
        assert rows["l0"][key] == pytest.approx(rows["swapped"][key], rel=1e-5, abs=1e-9)
    # before the read-out only the label position's own prediction (k = 1) moves, to the donor's
    assert rows[last]["k1_donor"] == pytest.approx(rows["donor"]["k1_donor"], rel=1e-5, abs=1e-9)
    assert rows[last]["k2_needle"] == pytest.approx(rows["clean"]["k2_needle"], rel=1e-5, abs=1e-9)
    obs = swap_batch(config, config.eval, "observation", 3, 8, seed=5, donors=True)
    assert torch.equal(obs.clean[:, : pos + 1], obs.swapped[:, : pos + 1])
    assert np.allclose(obs.swapped[:, pos + 1, -config.data.state_dim:], obs.other[:, 0].numpy())
    rows = {r["layer"]: r for r in token_swap_patching(cm, obs, pos + 1)}
    assert rows[last]["k2_donor"] == pytest.approx(rows["donor"]["k2_donor"], rel=1e-5, abs=1e-9)
    assert rows[last]["k1_needle"] == rows["clean"]["k1_needle"]  # k = 1 comes before the patched position


def test_patching_and_circuits_reach_the_report_through_records(run_dir, tmp_path):
    from fnabench.cli.main import main
    from fnabench.harness.records import read_records

    pytest.importorskip("matplotlib")
    for target in ("k1", "k2"):
        prune_run(run_dir, target, PruneSettings(sparsity=0.0, **FAST))
    assert patch_run(run_dir, examples=2, traces=4)["rows"]["label"][0]["layer"] == "clean"
    results, board = tmp_path / "results", tmp_path / "board"
    assert main(["recall", "report", str(run_dir), "--results", str(results), "--out-dir", str(board), "--quiet",
                 "--threads", "1"]) == 0
    records = read_records(results)
    tasks = {r["task"] for r in records}
    assert {"recall:h2,patch=label", "recall:h2,patch=observation", "recall:h2,circuit=k1,sparsity=0",
            "recall:h2,circuit=k2,sparsity=0"} <= tasks
    circuit = next(r for r in records if r["task"] == "recall:h2,circuit=k1,sparsity=0")
    assert circuit["primary_metric"] == "mse_to_model" and circuit["higher_is_better"]["mse_to_model"] is False
    assert all(r["higher_is_better"].get("recovered", True) for r in records)
    assert circuit["metrics"]["edges_kept"] == 46 and circuit["metrics"]["mse_to_model"] < 1e-10
    made = {name: (board / name).read_text() for name in ("patching.md", "circuits.md")}
    assert "**label swap**" in made["patching.md"] and "patched at layer 2" in made["patching.md"]
    assert "| smoke seed 0 | k1 (recall; label swapped) | 46 / 46 |" in made["circuits.md"]
    assert "Overlap of the two edge sets" in made["circuits.md"] and "| smoke seed 0 | 46 | 46 | 46 | 1 | 1 |" in \
        made["circuits.md"]
    assert (board / "circuits-s0.png").stat().st_size > 10_000 and (board / "patching-seed0.png").is_file()
    again = tmp_path / "again"  # the tables come back from the records alone
    assert main(["recall", "report", "--from-records", str(board / "records"), "--out-dir", str(again)]) == 0
    assert {name: (again / name).read_text() for name in made} == made


def test_prune_and_patch_commands(run_dir, capsys):
    from fnabench.cli import recall_cmd as cli

    pytest.importorskip("matplotlib")
    sizes = ["--examples", "4", "--traces", "8", "--test-examples", "3", "--test-traces", "8", "--batch", "16"]
    assert cli.main(["prune", str(run_dir), "--sparsity", "0", "--steps", "60", *sizes, "--quiet", "--threads",
                     "1"]) == 0
    out = capsys.readouterr().out
    assert "k2 (continuation; observation swapped)" in out and "circuits-s0.png" in out
    assert cli.main(["patch", str(run_dir), "--examples", "2", "--traces", "4", "--threads", "1"]) == 0
    assert "**observation swap**" in capsys.readouterr().out and (run_dir / "patching.png").is_file()
    assert cli.main(["prune", str(run_dir), "--sparsity", "1.5"]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err
    assert cli.main(["prune", str(run_dir), "--sparsity", "0.5", "--step", "7"]) == 2
    assert "no checkpoint at step 7" in capsys.readouterr().err
