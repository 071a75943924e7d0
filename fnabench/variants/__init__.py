"""Attention variants as pure tensor math (imports torch only): exact, FNA, Nyström, masking."""

from fnabench.variants.spec import SpecError
from fnabench.variants.variant import ForwardState, Variant, parse_variant

__all__ = ["ForwardState", "SpecError", "Variant", "parse_variant"]
