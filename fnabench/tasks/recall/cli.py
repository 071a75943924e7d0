"""``python -m fnabench.tasks.recall.cli``: the recall suite's command line moved to ``fnabench recall``
(:mod:`fnabench.cli.recall_cmd`); this path forwards to it without importing the command-line layer."""

import runpy

if __name__ == "__main__":
    runpy.run_module("fnabench.cli.recall_cmd", run_name="__main__", alter_sys=True)
