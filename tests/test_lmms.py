"""lmms-eval integration: the ``fnabench`` model found through the ``lmms_eval.models`` entry point, the offline
task shipped as an include path, and ``lmms:<task>`` cells in the harness (all on a tiny random LLaVA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval", reason="the vqa extra (lmms-eval) is not installed")

from fnabench.models import llava  # noqa: E402
from fnabench.models.offline.llava_shapes_arch import save_tiny  # noqa: E402
from fnabench.tasks.lmms_task import task_folder  # noqa: E402

TASK = "fnabench_shapes_vqa"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-llava"))


def test_the_model_is_found_by_its_entry_point():
    from lmms_eval.models import get_model

    from fnabench.adapters.lmms import FnabenchLLaVA

    assert get_model("fnabench") is FnabenchLLaVA


def test_variant_keys_split_off_by_model_args_rejoin_the_spec():
    from fnabench.adapters.lmms import variant_spec

    assert variant_spec("fna:m=64", {"layers": "-6:", "pinv": "newton"}) == "fna:m=64,layers=-6:,pinv=newton"
    assert variant_spec("fna", {"m": 16}) == "fna:m=16"
    assert variant_spec("'fna:m=64;layers=12:'", {}) == "fna:m=64,layers=12:"
    assert variant_spec("fna:m=8+mask", {"tokens": "all"}) == "fna:m=8+mask:tokens=all"


@pytest.fixture(scope="module")
def manager():
    from lmms_eval.tasks import TaskManager

    return TaskManager("ERROR", include_path=task_folder())  # indexes every lmms-eval task: made once


def _simple_evaluate(model, manager, limit=6):
    from lmms_eval.evaluator import simple_evaluate

    out = simple_evaluate(model=model, tasks=[TASK], limit=limit, log_samples=True, bootstrap_iters=0,
                          task_manager=manager, verbosity="ERROR")
    return out["results"][TASK], [s["filtered_resps"][0] for s in out["samples"][TASK]]


def test_patched_exact_and_every_token_a_landmark_answer_as_the_unpatched_model(tiny_dir, manager):
    """Same lmms-eval answers and scores through the fnabench model, whatever the placement (the logits
    themselves are compared in test_llava.py; a random model's answers are a weak check on their own)."""
    from fnabench.adapters.lmms import FnabenchLLaVA

    model, processor = llava.load_pretrained(str(tiny_dir))
    plain = FnabenchLLaVA(model=model, processor=processor, patched=True)  # not patched at all
    ref_scores, ref_answers = _simple_evaluate(plain, manager)
    for variant, placement in [("exact", "both"), ("fna:m=512", "vision"), ("fna:m=512", "language")]:
        lm = FnabenchLLaVA(model=model, processor=processor, variant=variant, placement=placement)
        try:
            scores, answers = _simple_evaluate(lm, manager)
        finally:
            lm.close()
        assert answers == ref_answers and scores == ref_scores, (variant, placement)


def _lmms_cli(tiny_dir: Path, out: Path, launcher: list[str], limit: int = 8) -> tuple[dict, dict[int, list], str]:
    """Run ``-m lmms_eval`` under ``launcher`` with samples logged: (its results file, {doc_id: answers}, its log)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, "-m", "lmms_eval", "--model", "fnabench", "--model_args",
           f"pretrained={tiny_dir},variant=fna:m=8,layers=1:,placement=language", "--tasks", TASK,
           "--include_path", task_folder(), "--limit", str(limit), "--batch_size", "1", "--log_samples",
           "--output_path", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in out.rglob("*results*.json")]
    samples = [json.loads(line) for p in out.rglob(f"*samples_{TASK}*.jsonl") for line in p.read_text().splitlines()]
    assert len(results) == 1 and samples, sorted(str(p) for p in out.rglob("*"))
    return results[0], {s["doc_id"]: s["filtered_resps"] for s in samples}, done.stdout + done.stderr


def test_python_m_lmms_eval_runs_offline_with_the_shipped_task(tiny_dir, tmp_path):
    results, answers, _ = _lmms_cli(tiny_dir, tmp_path, [sys.executable], limit=4)
    assert results["results"][TASK]["exact_match,none"] >= 0 and sorted(answers) == [0, 1, 2, 3]
    assert "fna:m=8,layers=1:" in results["config"]["model_args"]


@pytest.mark.slow
def test_accelerate_launch_with_two_cpu_processes_answers_and_scores_as_one_process(tiny_dir, tmp_path):
    """lmms-eval's own data parallelism (``accelerate launch --num_processes 2``, gloo on CPU): each rank
    answers a shard of the questions and rank 0 gathers them; every answer and the score equal one process's.
    (``--cpu`` would start one process where no mpirun is set up; ``--multi_gpu`` starts two through
    torch.distributed, which falls back to gloo without CUDA.)"""
    pytest.importorskip("accelerate", reason="accelerate (an lmms-eval dependency) is not installed")
    one, one_answers, _ = _lmms_cli(tiny_dir, tmp_path / "one", [sys.executable])
    two, two_answers, log = _lmms_cli(tiny_dir, tmp_path / "two", [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533"])
    assert "Running on rank 1 (local rank 1)" in log  # two processes ran, not one
    assert sorted(two_answers) == sorted(one_answers) == list(range(8))  # every question once, none twice
    assert two_answers == one_answers
    assert two["results"][TASK] == one["results"][TASK]


def test_an_lmms_cell_records_prefill_flops_ttft_kv_cache_and_decode_rate(tiny_dir, tmp_path):
    from fnabench.harness.config import SweepConfig
    from fnabench.harness.leaderboard import build_tables, render_table
    from fnabench.harness.runner import run_sweep

    config = SweepConfig(name="tiny-vqa", models=[f"llava:{tiny_dir}"], tasks=[f"lmms:{TASK}"],
                         variants=["exact", "fna:m=6,tower=text", "fastv:tokens=4,layers=1", "visionzip:tokens=6"],
                         batch_size=1, limit=4, timing_repeats=2, out=str(tmp_path / "out"))
    summary = run_sweep(config, quiet=True)
    assert summary.ok, summary.failed
    records = {r["variant"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json"))}
    language = records["fna:exclude=none,features=q,guarantee=prefix,iters=6,landmarks=stride,layers=:,m=6,"
                       "norm_ratio=3,pinv=ridge,rcond=auto,resample=false,seed=0,tower=text"]
    exact = records["exact:impl=sdpa"]
    assert language["kv_cache"]["bytes"] < exact["kv_cache"]["bytes"] == exact["kv_cache"]["full_bytes"]
    for r in records.values():
        assert r["items"] == {"test": 4} and r["flops"]["per"] == "prompt" and r["flops"]["gflops"] > 0
        assert r["timing"]["median_s"] > 0 and r["kv_cache"]["decode_tokens_per_s"] > 0
        assert set(r["metrics"]) == {"exact_match", "colour", "shape", "position", "count"}
    by_flops = {v.split("+")[-1].split(":")[0]: r["flops"]["total"] for v, r in records.items()}
    assert by_flops["fastv"] < by_flops["exact"] and by_flops["visionzip"] < by_flops["exact"]
    table = render_table(build_tables(records.values())[0])
    assert "decode tokens/s" in table and "prompts/s" in table


def test_an_lmms_cell_refuses_a_model_that_is_not_llava():
    from fnabench.models.loaded import LoadedModel
    from fnabench.tasks.base import Settings, TaskError
    from fnabench.tasks.lmms_task import make_task

    task = make_task(TASK)
    with pytest.raises(TaskError, match="needs a LLaVA-family model"):
        task.prepare(LoadedModel("tiny:vit", torch.nn.Linear(1, 1), lambda x: x, lambda x: x, 8, "tiny"), Settings())
    with pytest.raises(TaskError, match="unknown option"):
        make_task(TASK, limit=3)
