"""Moved to :mod:`fnabench.tasks.lmms_tasks`; this path keeps ``python -m fnabench.tasks.vqa.lmms_tasks`` working."""

from fnabench.tasks.lmms_tasks import DATA, FOLDER

__all__ = ["DATA", "FOLDER"]
