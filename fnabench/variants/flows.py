"""Every token-flow class by component name, and the per-tower flow object a patch attaches."""

from __future__ import annotations

from typing import Any

from fnabench.variants.fastv import FastV
from fnabench.variants.flow import TokenFlow, ToMe
from fnabench.variants.spec import Component
from fnabench.variants.visionzip import VisionZip

#: token-flow component name → the class that runs it (variants/flow.py, visionzip.py, fastv.py)
FLOW_CLASSES: dict[str, type[TokenFlow]] = {"tome": ToMe, "visionzip": VisionZip, "fastv": FastV}


def flow_class(name: str) -> type[TokenFlow]:
    """The class of the token flow ``name``."""
    return FLOW_CLASSES[name]


def make_flow(component: Component, num_layers: int, num_prefix: int, state: Any = None) -> TokenFlow:
    """The per-tower state object of the token-flow ``component``."""
    return flow_class(component.name)(component, num_layers, num_prefix, state)
