"""lmms-eval tasks shipped with fnabench: pass this folder as ``--include_path`` (``python -m
fnabench.tasks.lmms_tasks`` prints it), or let fnabench's ``lmms:<task>`` add it for you."""

from pathlib import Path

from fnabench.data.generated.vqa import test_docs

FOLDER = Path(__file__).resolve().parent
DATA = FOLDER / "fnabench_shapes_vqa.jsonl"


def write_data(path: Path = DATA) -> Path:
    """(Re)write the offline task's documents from the scene generator (a test keeps the file in step)."""
    import json


    path.write_text("".join(json.dumps(doc, sort_keys=True) + "\n" for doc in test_docs()))
    return path
