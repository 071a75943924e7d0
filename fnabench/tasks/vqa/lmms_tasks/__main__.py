"""``python -m fnabench.tasks.vqa.lmms_tasks`` prints the folder to pass to lmms-eval as ``--include_path``."""

from . import FOLDER

print(FOLDER)
