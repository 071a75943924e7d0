"""``python -m fnabench.tasks.vqa.lmms_tasks`` prints the folder to pass to lmms-eval as ``--include_path``."""

from fnabench.tasks.lmms_tasks import FOLDER

print(FOLDER)
