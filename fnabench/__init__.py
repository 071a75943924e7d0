"""fnabench: what a training-free attention approximation costs and buys in a pretrained transformer.

Public API: :func:`patch`, :func:`parse_variant`, :func:`count_flops`, :func:`analyze`; the pure FNA function is
``fnabench.variants.fna.nystrom_attention``.
"""

from .adapters import PatchHandle, UnsupportedModelError, patch
from .analysis import analyze
from .harness.registry import load_model
from .measure import FlopCount, count_flops, measure_latency, peak_memory
from .variants import SpecError, Variant, parse_variant

__version__ = "0.1.0"

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
