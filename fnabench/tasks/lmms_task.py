"""``lmms:<task>``: an lmms-eval task as a harness cell, run by lmms-eval's own ``simple_evaluate``.

The runner loads a LLaVA-family model (adapters/llava.py), patches the cell's variant into it and hands
it here; the task wraps that patched model as lmms-eval's ``fnabench`` model and evaluates ``<task>``
with lmms-eval's data loading, prompts, generation settings and metrics. Every task lmms-eval knows is
accepted, plus the tasks fnabench ships (``fnabench_shapes_vqa``, found offline) and those under the
``include_path`` option. The runner adds what lmms-eval does not measure: counted prefill FLOPs of one
prompt, its latency (time to first token), the KV cache it leaves and decode tokens/s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from fnabench._extras import require
from fnabench.models.loaded import LoadedModel
from fnabench.tasks.base import Option, Settings, TaskError, check_options, positive_int
from fnabench.tasks.lmms_tasks import FOLDER

#: lmms-eval metrics that are shares of the documents (a binomial standard error applies)
PROPORTIONS = ("exact_match", "accuracy", "acc", "relaxed_accuracy")

OPTIONS = {
    "include_path": Option(str, "a folder of lmms-eval task YAML files"),
    "primary": Option(str, "the name of one of the task's metrics"),
    "max_new_tokens": positive_int(),
}


def task_folder() -> str:
    """The folder of the lmms-eval tasks fnabench ships (``--include_path`` for the lmms-eval CLI)."""
    return str(FOLDER)


@dataclass
class LmmsTask:
    """One lmms-eval task evaluated on the patched model; metrics as lmms-eval aggregates them."""

    task: str
    include_path: str | None = None
    primary_option: str | None = None
    max_new_tokens: int | None = None
    per: str = "prompt"
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    primary: str = "exact_match"

    @property
    def name(self) -> str:
        return f"lmms:{self.task}"

    @property
    def proportions(self) -> dict[str, tuple[str, float]]:
        return {m: ("test", 1.0) for m in PROPORTIONS if m in self.higher_is_better}

    def _manager(self):
        tasks = require("lmms_eval.tasks")
        paths = [task_folder(), *([self.include_path] if self.include_path else [])]
        return tasks.TaskManager("ERROR", include_path=paths)

    def prepare(self, loaded: LoadedModel, settings: Settings) -> dict[str, Any]:
        """The task manager, the task object and one prompt to time (the first document's text)."""
        if "prompt_ids" not in loaded.extra:
            raise TaskError(f"{self.name} needs a LLaVA-family model (llava:<folder-or-hub-id>, "
                            f"offline:llava-shapes), got {loaded.name}")
        manager = self._manager()
        if self.task not in manager.all_tasks:
            raise TaskError(f"{self.name}: lmms-eval knows no task {self.task!r} (with fnabench's tasks and "
                            f"include_path={self.include_path!r}); accepted: e.g. fnabench_shapes_vqa, textvqa_val")
        evaluator = require("lmms_eval.evaluator")
        task_obj = evaluator.get_task_dict([self.task], manager)[self.task]
        docs = task_obj.test_docs() if task_obj.has_test_docs() else task_obj.validation_docs()
        example = task_obj.doc_to_text(docs[0])
        example = example if isinstance(example, str) else str(example)
        return {"manager": manager, "example": example, "ids": loaded.extra["prompt_ids"](example),
                "documents": len(docs)}

    def example_batch(self, prepared: dict[str, Any], settings: Settings) -> torch.Tensor:
        """Token ids of one prompt (the first document's question with the model's example image)."""
        return prepared["ids"].expand(settings.batch_size, -1)

    def items(self, prepared: dict[str, Any]) -> dict[str, int]:
        return {"test": int(prepared.get("evaluated", prepared["documents"]))}

    def evaluate(self, loaded: LoadedModel, prepared: dict[str, Any], settings: Settings) -> dict[str, float]:
        """lmms-eval's ``simple_evaluate`` on the model as patched now; its aggregated metrics."""
        from fnabench.adapters.lmms import FnabenchLLaVA

        evaluator = require("lmms_eval.evaluator")
        lm = FnabenchLLaVA.from_loaded(loaded, batch_size=settings.batch_size)
        if self.max_new_tokens is not None:
            lm.max_new_tokens = self.max_new_tokens
        for name in ("lmms-eval", "lmms_eval"):
            logging.getLogger(name).setLevel(logging.ERROR)
        results = evaluator.simple_evaluate(model=lm, tasks=[self.task], limit=settings.limit,
                                            task_manager=prepared["manager"], log_samples=False, bootstrap_iters=0,
                                            verbosity="ERROR", random_seed=settings.seed,
                                            numpy_random_seed=settings.seed, torch_random_seed=settings.seed)
        scores = results["results"][self.task]
        metrics = {}
        for key, value in scores.items():
            name = key.split(",")[0]
            if "_stderr" in name or name == "alias" or not isinstance(value, (int, float)):
                continue
            metrics[name] = float(value)
        self.higher_is_better = {k: bool(v) for k, v in results["higher_is_better"].get(self.task, {}).items()
                                 if k in metrics and v is not None}
        self.primary = self.primary_option or ("exact_match" if "exact_match" in metrics else sorted(metrics)[0])
        if self.primary not in metrics:
            raise TaskError(f"{self.name}: primary={self.primary!r} is not one of its metrics "
                            f"{', '.join(sorted(metrics))}")
        prepared["evaluated"] = int(results["n-samples"][self.task]["effective"])
        return metrics


def make_task(source: str, **options) -> LmmsTask:
    """Registry factory: ``lmms:<task>`` with options ``include_path``, ``primary``, ``max_new_tokens``."""
    if not source or "," in source:
        raise TaskError(f"lmms:{source}: name one lmms-eval task, e.g. lmms:fnabench_shapes_vqa")
    opts = check_options(f"lmms:{source}", options, OPTIONS)
    return LmmsTask(source, include_path=opts.get("include_path"), primary_option=opts.get("primary"),
                    max_new_tokens=opts.get("max_new_tokens"))


make_task.options: dict[str, Option] = OPTIONS
