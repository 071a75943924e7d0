"""The task registry: ``prefix:ARG`` → the factory of one task module (lazy ``"module:attr"`` strings). Other
packages add tasks under the ``fnabench.tasks`` entry-point group."""

from __future__ import annotations

from typing import Any

from fnabench._registry import Registry

TASKS = Registry("task", "fnabench.tasks")

TASKS.register("recall", "fnabench.tasks.recall.task:make_task",
               "recall:<probes>|all — recall (k=1) and continuation (k=2, 3) error of a recall GPT-2")
TASKS.register("fidelity", "fnabench.tasks.fidelity:make_task",
               "fidelity:images|synthetic — feature error vs exact attention, no labels needed")
TASKS.register("knn", "fnabench.tasks.probe:make_knn_task",
               "knn:digits|mnist|folder — DINO-style weighted k-NN (k=20, T=0.07) on frozen features")
TASKS.register("linear", "fnabench.tasks.probe:make_linear_task",
               "linear:digits|mnist|folder — logistic-regression probe on frozen features")
TASKS.register("classify", "fnabench.tasks.classify:make_task",
               "classify:folder|wds|shapes — the model's own head and preprocessing: top-1/top-5, per class, ReaL")
TASKS.register("lmms", "fnabench.tasks.lmms_task:make_task",
               "lmms:<task> — an lmms-eval task through simple_evaluate (fnabench's own: fnabench_shapes_vqa)")
TASKS.register("clip_benchmark", "fnabench.tasks.clip_benchmark_task:make_task",
               "clip_benchmark:<dataset>|shapes — CLIP_benchmark zero-shot retrieval/classification (dataset_root)")
TASKS.register("mmseg", "fnabench.tasks.mmseg_task:make_task",
               "mmseg:<config> — mmsegmentation's test loop (aAcc, mIoU, mAcc); checkpoint, data_root, work_dir")


def make_task(name: str, options: dict[str, Any] | None = None):
    """Build a task by registry name, e.g. ``fidelity:images``, with its config options."""
    factory, arg = TASKS.resolve(name)
    return factory(arg, **(options or {}))
