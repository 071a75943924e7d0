"""The token-flow class of a component (its declaration names it), and the per-tower flow object a patch attaches."""

from __future__ import annotations

from typing import Any

from fnabench.variants.components import DECLARATIONS, FLOW_COMPONENTS
from fnabench.variants.flow import TokenFlow
from fnabench.variants.spec import Component


def flow_class(name: str) -> type[TokenFlow]:
    """The class of the token flow ``name`` (KeyError for a name that is no token flow)."""
    if name not in FLOW_COMPONENTS:
        raise KeyError(name)
    cls = DECLARATIONS[name].flow_class
    assert cls is not None  # ComponentDecl refuses a token flow without one
    return cls


def make_flow(component: Component, num_layers: int, num_prefix: int, state: Any = None) -> TokenFlow:
    """The per-tower state object of the token-flow ``component``."""
    return flow_class(component.name)(component, num_layers, num_prefix, state)
