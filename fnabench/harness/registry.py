"""The registries where they used to live: models (:mod:`fnabench.models.registry`), tasks
(:mod:`fnabench.tasks.registry`) and variant presets (:mod:`fnabench.variants.presets`)."""

from fnabench._registry import Registry, RegistryError
from fnabench.models.registry import CAUSAL_MODELS, MODELS, is_causal_model, load_model
from fnabench.tasks.registry import TASKS, make_task
from fnabench.variants.presets import VARIANTS, expand_variant

__all__ = ["CAUSAL_MODELS", "MODELS", "TASKS", "VARIANTS", "Registry", "RegistryError", "expand_variant",
           "is_causal_model", "load_model", "make_task"]
