"""Symbolic in-context recall task suite (arXiv:2507.01414): interleaved linear-system traces with symbolic
labels, GPT-2 regression models, training, first- vs second-token recall dynamics, OOD probes, records,
and the first/second-token ICL task for checkpointed language models.

Modules: ``config``/``presets`` (settings), ``systems``/``tokens``/``traces``/``queries`` (data),
``baselines``, ``model``, ``costs`` (FLOPs), ``train``, ``metrics``/``evaluate``, ``plots``/``report``,
``records`` (harness records), ``icl``, ``cli``. Importing this package needs only numpy.
"""

from fnabench.tasks.recall.presets import PRESETS, get_preset
from fnabench.tasks.recall.run_config import ConfigError, DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig

__all__ = ["PRESETS", "ConfigError", "DataConfig", "EvalConfig", "ModelConfig", "RunConfig", "TrainConfig",
           "get_preset"]
