"""The offline VQA task for lmms-eval: documents from the JSON lines file beside this module, images drawn
from their scene descriptions (fnabench.data.generated.vqa), exact-match accuracy overall and per kind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from lmms_eval.api.task import ConfigurableTask

from fnabench.data.generated import vqa as scenes

HERE = Path(__file__).resolve().parent
#: the side the scenes are drawn at (the processor resizes to the model's own size)
IMAGE_SIZE = 168


class ShapesVQATask(ConfigurableTask):
    """A ConfigurableTask whose documents come from the package's own JSON lines file (no hub)."""

    def __init__(self, *args, config: dict[str, Any] | None = None, **kwargs) -> None:
        config = {k: v for k, v in (config or {}).items() if k != "class"}
        super().__init__(*args, config=config, **kwargs)

    def download(self, dataset_kwargs: dict[str, Any] | None = None) -> None:
        path = HERE / self.config.dataset_path
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for row in rows:  # arrow wants one type per column: keep the scene as its JSON text
            row["scene"] = json.dumps(row["scene"])
        self.dataset = DatasetDict({self.config.test_split: Dataset.from_list(rows)})
        self.dataset_no_image = self.dataset


def doc_to_visual(doc: dict) -> list:
    return [scenes.scene_from_dict(json.loads(doc["scene"])).image(IMAGE_SIZE)]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def normalise(text: str) -> str:
    """Lower-cased, inner whitespace collapsed, trailing punctuation dropped."""
    return " ".join(str(text).lower().replace(".", " ").replace(",", " ").split())


def process_results(doc: dict, results: list[str]) -> dict:
    right = float(normalise(results[0]) == normalise(doc["answer"]))
    entry = {"kind": doc["kind"], "right": right}
    return {"exact_match": right, **{kind: entry for kind in scenes.KINDS}}


def _kind_mean(kind: str):
    """The aggregation of metric ``kind``: accuracy over the documents of that kind (process_results gives
    every kind's metric every document's entry; lmms-eval cannot leave a metric out for some documents)."""

    def mean(entries: list[dict]) -> float:
        mine = [e["right"] for e in entries if e["kind"] == kind]
        return sum(mine) / len(mine) if mine else float("nan")

    mean.__name__ = f"{kind}_accuracy"
    return mean


colour_accuracy, shape_accuracy, position_accuracy, count_accuracy = (_kind_mean(k) for k in scenes.KINDS)
