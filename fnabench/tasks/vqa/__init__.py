"""Former home of the offline VQA model and task files; kept so ``python -m fnabench.tasks.vqa.train`` and
``python -m fnabench.tasks.vqa.lmms_tasks`` keep working (see fnabench.models.offline and fnabench.tasks.lmms_tasks)."""
