"""Attention variants as pure tensor math (imports torch only): exact, FNA, Nyström, masking."""

from .spec import SpecError
from .variant import ForwardState, Variant, parse_variant

__all__ = ["ForwardState", "SpecError", "Variant", "parse_variant"]
