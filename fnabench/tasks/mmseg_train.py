"""``python -m fnabench.tasks.mmseg_train``: moved to :mod:`fnabench.models.offline.seg_head_training`."""

import sys

from fnabench.models.offline.seg_head_training import main

if __name__ == "__main__":
    sys.exit(main())
