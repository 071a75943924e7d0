"""``python -m fnabench.tasks.vqa.train``: moved to :mod:`fnabench.models.offline.llava_shapes_training`."""

from fnabench.models.offline.llava_shapes_training import main

if __name__ == "__main__":
    raise SystemExit(main())
