"""A run carried to another machine as its evaluations, its last checkpoint and resume.pt: the whole curve comes
back from the cached evaluations, and training resumes to the same weights as an uninterrupted run."""

from __future__ import annotations

import shutil

import pytest
import torch

from fnabench.cli import recall_cmd as recall_cli
from fnabench.tasks.recall import rundir
from fnabench.tasks.recall.evaluate import evaluate_run

pytest.importorskip("transformers")

TINY = ["--set=train.steps=30", "--set=train.checkpoint_every=10", "--set=data.train_systems=100",
        "--set=eval.examples=2", "--set=eval.traces=4"]


def _train(out, *extra):
    argv = ["train", "--preset", "smoke", *TINY, "--seed", "0", "--out", str(out), "--threads", "1", "--quiet"]
    assert recall_cli.main(argv + list(extra)) == 0


def test_a_carried_run_keeps_its_curve_and_resumes_to_the_same_weights(tmp_path):
    previous = torch.get_num_threads()
    try:
        whole, carried = tmp_path / "whole", tmp_path / "carried"
        _train(whole)
        _train(carried, "--until-step", "20")
        before = evaluate_run(carried, progress=False)
        for _, path in rundir.list_checkpoints(carried)[:-1]:  # what a carried run leaves behind
            path.unlink()
        assert evaluate_run(carried, progress=False) == before  # the curve from the cached evaluations
        _train(carried)  # resume from resume.pt to the configured 30 steps
        assert [s for s, _ in rundir.list_checkpoints(carried)] == [20, 30]
        curve = evaluate_run(carried, progress=False)
        assert curve["steps"] == evaluate_run(whole, progress=False)["steps"] == [0, 10, 20, 30]
        final = {s: p for s, p in rundir.list_checkpoints(whole)}[30]
        mine = {s: p for s, p in rundir.list_checkpoints(carried)}[30]
        a = torch.load(final, map_location="cpu", weights_only=False)
        b = torch.load(mine, map_location="cpu", weights_only=False)
        weights = (lambda ck: ck.get("model", ck))  # noqa: E731
        assert all(torch.equal(weights(a)[k], weights(b)[k]) for k in weights(a))
        assert curve["model"] == evaluate_run(whole, progress=False)["model"]  # the same errors at every step
    finally:
        torch.set_num_threads(previous)
        shutil.rmtree(tmp_path, ignore_errors=True)
