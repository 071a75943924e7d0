"""Recall model and training: loss masking, counted FLOPs, loss going down, bit-exact resume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fnabench.tasks.recall import rundir
from fnabench.tasks.recall.costs import forward_flops, train_step_flops
from fnabench.tasks.recall.network import build_model, masked_mse
from fnabench.tasks.recall.run_config import ConfigError, DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig
from fnabench.tasks.recall.tokens import TokenLayout
from fnabench.tasks.recall.training import batch_tensors, train

pytest.importorskip("transformers")

TINY = RunConfig(
    preset="test",
    data=DataConfig(state_dim=3, num_labels=6, context=40, train_systems=200, val_systems=10),
    model=ModelConfig(n_embd=32, n_layer=2, n_head=2),
    train=TrainConfig(batch=8, lr=3e-3, steps=12, checkpoint_every=4, log_every=2, seed=3),
    eval=EvalConfig(haystack=2, segment_obs=4, examples=3, traces=6, ks=(1, 2, 3), batch=16),
)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_label_targets_are_masked_and_the_open_label_prediction_is_trained():
    inputs, targets, mask = batch_tensors(TINY, 0)
    layout = TokenLayout(3, 6)
    tokens = inputs.numpy()
    opens = (tokens[..., : 2 * layout.num_labels : 2] > 0).any(-1)  # input position holds an open label
    closes_next = np.zeros_like(opens)
    closes_next[:, :-1] = (tokens[:, 1:, 1 : 2 * layout.num_labels : 2] > 0).any(-1)
    assert not mask.numpy()[closes_next].any()  # a close label as the next token is never a target
    has_obs_after_open = opens & mask.numpy()
    assert has_obs_after_open.sum() > 0  # open labels followed by an observation are trained

    pred = torch.zeros_like(targets, requires_grad=True)
    loss = masked_mse(pred, targets, mask)
    loss.backward()
    grad = pred.grad.abs().sum(-1)
    assert (grad[~mask] == 0).all()  # masked (label/start) targets contribute nothing
    assert (grad[torch.from_numpy(has_obs_after_open)] > 0).all()  # the prediction at an open label does
    # normalisation: summed squared L2 error ÷ number of unmasked positions
    expected = (targets.pow(2).sum(-1) * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # changing predictions only where the target is a label leaves the loss unchanged
    noisy = torch.where(mask[..., None], torch.zeros_like(targets), torch.randn_like(targets) * 100)
    assert masked_mse(noisy, targets, mask).item() == pytest.approx(loss.item(), rel=1e-6)


def test_model_shapes_and_counted_flops_match_closed_form():
    torch.manual_seed(0)
    model = build_model(TINY)
    layout = TokenLayout(3, 6)
    t, d, layers = 39, 32, 2
    out = model(torch.zeros(2, t, layout.dim))
    assert out.shape == (2, t, 3)
    # per layer: qkv (3d²), proj (d²), MLP (8d²) per token; QKᵀ and AV (2·T²·d); plus read-in and read-out
    macs = t * layout.dim * d + layers * (12 * t * d * d + 2 * t * t * d) + t * d * 3
    assert forward_flops(model, t) == 2 * macs
    inputs, targets, mask = batch_tensors(TINY, 0)
    step = train_step_flops(model, inputs, targets, mask)
    # backward costs two forward matmuls per matmul, except the read-in's input gradient (inputs need none)
    batch = inputs.shape[0]
    assert step == 3 * batch * 2 * macs - batch * 2 * t * layout.dim * d
    assert all(p.grad is None for p in model.parameters())  # counting leaves no gradients behind


def _held_out_loss(config: RunConfig, run: Path, step: int) -> float:
    held = [batch_tensors(replace(config, train=replace(config.train, seed=99)), s) for s in range(4)]
    model = build_model(config)
    model.load_state_dict(torch.load(rundir.step_path(run, step), weights_only=False)["model"])
    with torch.no_grad():
        return float(np.mean([masked_mse(model(x), y, m).item() for x, y, m in held]))


def test_tiny_training_run_lowers_the_loss(tmp_path):
    # identity dynamics: continuing a trajectory is copying its last state, learnable in ~100 steps
    config = replace(TINY, data=replace(TINY.data, family="ident"),
                     train=replace(TINY.train, steps=100, checkpoint_every=50, log_every=10))
    run = tmp_path / "run"
    result = train(run, config, progress=False)
    log = rundir.read_log(run)
    assert result.step == 100 and result.examples == 800 and len(log) == 10
    assert [s for s, _ in rundir.list_checkpoints(run)] == [0, 50, 100]
    assert result.flops == 100 * rundir.read_json(run / rundir.COSTS)["train_step_flops"]
    held = [batch_tensors(replace(config, train=replace(config.train, seed=99)), s) for s in range(4)]
    zero = float(np.mean([masked_mse(torch.zeros_like(y), y, m).item() for _, y, m in held]))
    before, after = _held_out_loss(config, run, 0), _held_out_loss(config, run, 100)
    assert after < 0.25 * zero < before  # well below predicting zero, and far below the untrained model
    assert log[-1]["loss"] < 0.3 * log[0]["loss"]


def test_resume_after_a_stop_gives_the_same_weights(tmp_path):
    unbroken = train(tmp_path / "a", TINY, progress=False)
    stopped = train(tmp_path / "b", TINY, until_step=6, progress=False)  # between checkpoints
    assert stopped.stopped and stopped.step == 6
    resumed = train(tmp_path / "b", progress=False)  # config comes from the run directory
    assert resumed.step == unbroken.step == 12 and resumed.steps_run == 6
    a = torch.load(rundir.step_path(tmp_path / "a", 12), weights_only=False)["model"]
    b = torch.load(rundir.step_path(tmp_path / "b", 12), weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def without_time(run):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rundir.read_log(run)]

    assert without_time(tmp_path / "a") == without_time(tmp_path / "b")  # same losses, steps, examples, FLOPs
    # an interrupted run (resume.pt at a step past the last checkpoint file) resumes too
    state = torch.load(tmp_path / "b" / rundir.RESUME, weights_only=False)
    assert state["step"] == 12 and "optimizer" in state


def test_seeds_differ_and_configs_are_guarded(tmp_path):
    train(tmp_path / "s3", TINY, until_step=4, progress=False)
    other = replace(TINY, train=replace(TINY.train, seed=4))
    train(tmp_path / "s4", other, until_step=4, progress=False)
    a = torch.load(rundir.step_path(tmp_path / "s3", 4), weights_only=False)["model"]
    b = torch.load(rundir.step_path(tmp_path / "s4", 4), weights_only=False)["model"]
    assert not torch.equal(a["read_in.weight"], b["read_in.weight"])
    with pytest.raises(ConfigError, match="different config"):
        train(tmp_path / "s3", other, progress=False)
    with pytest.raises(ConfigError, match="divisible"):
        replace(TINY, model=replace(TINY.model, n_head=5)).validate()


def test_warm_up_resumes_bit_exactly_and_ramps_the_learning_rate(tmp_path):
    config = replace(TINY, train=replace(TINY.train, warmup=8))
    assert [config.train.lr_at(s) for s in (0, 3, 7, 8, 100)] == pytest.approx([3e-3 / 8, 3e-3 / 2, 3e-3, 3e-3, 3e-3])
    unbroken = train(tmp_path / "a", config, progress=False)
    train(tmp_path / "b", config, until_step=5, progress=False)
    train(tmp_path / "b", progress=False)
    a = torch.load(rundir.step_path(tmp_path / "a", 12), weights_only=False)["model"]
    b = torch.load(rundir.step_path(tmp_path / "b", 12), weights_only=False)["model"]
    assert unbroken.step == 12 and all(torch.equal(a[k], b[k]) for k in a)
    train(tmp_path / "c", TINY, progress=False)
    plain = torch.load(rundir.step_path(tmp_path / "c", 12), weights_only=False)["model"]
    assert not torch.equal(plain["read_in.weight"], a["read_in.weight"])  # the warm-up changed the run
    assert torch.load(tmp_path / "a" / rundir.RESUME, weights_only=False)["optimizer"]["param_groups"][0]["lr"] == 3e-3


def test_later_keys_leave_older_identities_alone(tmp_path):
    from fnabench.tasks.recall.presets import get_preset
    from fnabench.tasks.recall.run_config import read_toml, section_dict
    from fnabench.tasks.recall.task import run_folder

    cpu = get_preset("cpu").to_dict()
    assert "warmup" not in cpu["train"] and "emergence_rule" not in cpu["eval"]
    assert run_folder("cpu", 0)[0].name == "cpu-seed0-b998bb5fcb"  # the cache of runs trained before these keys
    n5 = get_preset("cpu-n5")
    assert n5.to_dict()["eval"]["emergence_rule"] == "sustained"
    assert section_dict(replace(n5.train, warmup=3))["warmup"] == 3
    root = Path(__file__).resolve().parents[2] / "configs" / "recall"
    for name, preset in (("cpu.toml", "cpu"), ("cpu_n5.toml", "cpu-n5")):
        assert RunConfig.from_dict(read_toml(root / name)).to_dict() == get_preset(preset).to_dict()
    # a run's evaluation settings may change on resume (they do not change its weights); its training may not
    train(tmp_path / "r", TINY, until_step=4, progress=False)
    relabelled = replace(TINY, eval=replace(TINY.eval, emergence_rule="sustained", examples=2))
    train(tmp_path / "r", relabelled, until_step=6, progress=False)
    assert rundir.load_config(tmp_path / "r").eval.emergence_rule == "sustained"
    with pytest.raises(ConfigError, match="different config"):
        train(tmp_path / "r", replace(TINY, train=replace(TINY.train, warmup=2)), progress=False)
    with pytest.raises(ConfigError, match="emergence_rule must be one of first, sustained"):
        replace(TINY, eval=replace(TINY.eval, emergence_rule="late")).validate()


def test_the_sustained_rule_names_the_stay_below_point():
    from fnabench.tasks.recall.evaluate import emergence
    from fnabench.tasks.recall.metrics import emergence_point
    from fnabench.tasks.recall.tables import emergence_table

    medians = [0.9, 0.3, 0.8, 0.3, 0.2, 0.1]
    summary = {"zero": {"final": {"1": {"median": 1.0}}}, "model": {"final": {"1": {"median": medians}}},
               "steps": list(range(6)), "examples": [10 * s for s in range(6)], "flops": [100 * s for s in range(6)]}
    first, sustained = emergence(summary, "1", 0.5), emergence(summary, "1", 0.5, "sustained")
    assert emergence_point(first) == 10 and emergence_point(sustained) == 30 and "rule" not in first
    assert emergence_point(sustained, "flops") == 300
    curves = {k: {"median": medians, "q25": medians, "q75": medians} for k in ("1", "2")}
    run = {**summary, "model": {"final": curves}, "zero": {"final": {"1": {"median": 1.0}, "2": {"median": 1.0}}},
           "seconds": [0.0] * 6, "emergence": {"1": sustained, "2": emergence(summary, "1", 0.5, "sustained")}}
    table = emergence_table([("r", run, {"parameters": 1})])
    assert table.startswith("Emergence (sustained)") and "| 30 (first below at 10) |" in table
