"""Recall metrics: hand-built traces with known answers, evaluation alignment, emergence, records, tables."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from fnabench.tasks.recall.evaluate import emergence, evaluate_model, summarize
from fnabench.tasks.recall.metrics import first_below, k_after, position_errors, quartiles, stays_below
from fnabench.tasks.recall.run_config import DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig
from fnabench.tasks.recall.tokens import TokenLayout


def _hand_trace():
    """[start, open0, a, b, close0, open0, c, d] with n = 2, 2 labels: the query re-opens label 0."""
    layout = TokenLayout(2, 2)
    tokens = layout.empty(8)
    layout.put_start(tokens, 0)
    layout.put_open(tokens, 1, 0)
    layout.put_states(tokens, 2, np.array([[1, 0], [0, 1]], dtype=np.float32))  # a, b
    layout.put_close(tokens, 4, 0)
    layout.put_open(tokens, 5, 0)
    layout.put_states(tokens, 6, np.array([[-1, 0], [0, -1]], dtype=np.float32))  # c, d
    return layout, tokens


def test_position_errors_on_a_hand_built_trace():
    layout, tokens = _hand_trace()
    pred = np.zeros((7, 2))
    pred[1] = [1, 1]  # at open0 (pos 1) predicting a = (1, 0): error 1
    pred[2] = [0, 3]  # at a, predicting b = (0, 1): error 4
    pred[3] = [9, 9]  # at b, the next token is close0: masked
    pred[5] = [-1, 0]  # at the re-opened label, predicting c: exact → 0
    pred[6] = [0, 1]  # at c, predicting d = (0, -1): error 4
    err = position_errors(pred, tokens, layout)
    expected = np.array([np.nan, np.nan, 1.0, 4.0, np.nan, np.nan, 0.0, 4.0])
    np.testing.assert_array_equal(np.isnan(err), np.isnan(expected))
    np.testing.assert_allclose(err[~np.isnan(err)], expected[~np.isnan(expected)])
    after_final = k_after(err, 5, (1, 2))
    after_initial = k_after(err, 1, (1, 2))
    assert after_final == {1: 0.0, 2: 4.0} and after_initial == {1: 1.0, 2: 4.0}


def test_quartiles_and_emergence_on_known_curves():
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == {"q25": 2.0, "median": 3.0, "q75": 4.0}
    assert first_below([0.9, 0.5, 0.3, 0.6, 0.2], 0.4) == 2
    assert stays_below([0.9, 0.5, 0.3, 0.6, 0.2], 0.4) == 4
    assert first_below([0.9, 0.8], 0.4) is None and stays_below([0.1, 0.9], 0.4) is None
    q = {"q25": 0.0, "median": 0.0, "q75": 0.0}

    def point(m1, m2):
        return {"model": {"final": {"1": {**q, "median": m1}, "2": {**q, "median": m2}}, "initial": {}}}

    rows = [{"step": s, "examples": 10 * s, "flops": 100 * s, "seconds": float(s), **point(m1, m2)}
            for s, m1, m2 in [(0, 0.9, 0.9), (5, 0.85, 0.5), (10, 0.8, 0.3), (15, 0.2, 0.5), (20, 0.1, 0.1)]]
    base = {"final": {"1": {**q, "median": 0.8}, "2": {**q, "median": 0.8}}, "initial": {}}
    summary = summarize(rows[::-1], {"zero": base, "ls": base}, EvalConfig(ks=(1, 2)), "none")
    assert summary["steps"] == [0, 5, 10, 15, 20]
    e1, e2 = summary["emergence"]["1"], summary["emergence"]["2"]
    assert e1["threshold"] == pytest.approx(0.4)
    assert (e1["step"], e1["examples"], e1["flops"]) == (15, 150, 1500)
    assert (e2["step"], e2["examples"], e2["flops"]) == (10, 100, 1000)
    assert e2["stable_step"] == 20  # k=2 rose back above the threshold at step 15
    assert emergence(summary, "1", 0.1)["step"] is None


class _CopyLast(nn.Module):
    """Predicts the state of the current input token (zero at labels): exact continuation for A = I."""

    def __init__(self, layout: TokenLayout) -> None:
        super().__init__()
        self.layout = layout

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[..., self.layout.state_slice]


IDENT = RunConfig(
    preset="test",
    data=DataConfig(state_dim=3, num_labels=6, context=40, family="ident", train_systems=50, val_systems=10),
    model=ModelConfig(n_embd=32, n_layer=2, n_head=2),
    train=TrainConfig(batch=4, steps=4, checkpoint_every=2),
    eval=EvalConfig(haystack=3, segment_obs=4, examples=5, traces=7, ks=(1, 2, 3), batch=4),
)


def test_evaluation_is_aligned_with_k_after_the_open_label():
    # under A = I a copy-last model is exact from the second resumed token on, and at k = 1 (the open label,
    # which holds no state) it predicts zero: its k = 1 error must equal the zero predictor's exactly
    model = _CopyLast(TokenLayout(3, 6))
    out = evaluate_model(model, IDENT, IDENT.eval, with_baselines=True)
    for series in ("final", "initial"):
        assert out["model"][series]["1"] == pytest.approx(out["zero"][series]["1"])
        assert out["model"][series]["1"]["median"] > 0.2
        for k in ("2", "3"):
            assert out["model"][series][k]["median"] == pytest.approx(0.0, abs=1e-12)
    # least squares knows the system: exact after the needle's haystack segment (identity needs 1 transition)
    assert out["ls"]["final"]["1"]["median"] == pytest.approx(0.0, abs=1e-10)
    assert out["ls"]["initial"]["1"] == out["zero"]["initial"]["1"]  # nothing seen yet: predicts zero


def test_zero_baseline_on_queries_is_near_087_for_n5():
    config = replace(IDENT, data=DataConfig(state_dim=5, num_labels=6, context=40, family="ortho_haar",
                                            train_systems=10, val_systems=40))
    cfg = replace(config.eval, examples=20, traces=200)
    from fnabench.tasks.recall.evaluate import evaluate_baselines

    zero = evaluate_baselines(config, cfg)["zero"]["final"]
    assert zero["1"]["median"] == pytest.approx(0.87, abs=0.05)
    assert zero["2"]["median"] == pytest.approx(zero["1"]["median"], rel=1e-5)  # orthogonal: same norm
