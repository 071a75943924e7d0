"""fnabench: what a training-free attention approximation costs and buys in a pretrained transformer.

Public API: :func:`patch`, :func:`parse_variant`, :func:`count_flops`, :func:`analyze`; the pure FNA function is
``fnabench.variants.fna.fna_attention``.
"""

from fnabench._version import __version__
from fnabench.adapters import PatchHandle, UnsupportedModelError, patch
from fnabench.analysis import analyze
from fnabench.measure import FlopCount, count_flops, measure_latency, peak_memory
from fnabench.models.registry import load_model
from fnabench.variants import SpecError, Variant, parse_variant

__all__ = [
    "FlopCount",
    "PatchHandle",
    "SpecError",
    "UnsupportedModelError",
    "Variant",
    "__version__",
    "analyze",
    "count_flops",
    "load_model",
    "measure_latency",
    "parse_variant",
    "patch",
    "peak_memory",
]
