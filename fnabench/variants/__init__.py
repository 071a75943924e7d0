"""Attention variants as pure tensor math (imports torch only): exact, FNA, Nyström, masking, token flows.

Each component module declares its component once (``COMPONENT = ComponentDecl(...)``, component.py);
components.py registers them, and the grammar (spec.py) and the dispatch (variant.py) read the registry."""

from fnabench.variants.spec import SpecError
from fnabench.variants.variant import ForwardState, Variant, parse_variant

__all__ = ["ForwardState", "SpecError", "Variant", "parse_variant"]
