"""Massive and artifact tokens: residual-stream norms, massive activations, attention sinks, and what
removing one kind does to the other (arXiv:2507.16018 §4.2–4.4; registers, Darcet et al. 2024; massive
activations, Sun et al. 2024).

``analyze(model, inputs) -> Report`` and ``ablate(model, inputs, kind) -> Ablation``; the ``fnabench analyze``
command writes their figures, JSON and CSV, and stores harness records for a leaderboard.
"""

from fnabench.analysis.analyze import analyze
from fnabench.analysis.capture import AnalysisInputError, attention_received
from fnabench.analysis.report import KINDS, Report, Thresholds

__all__ = ["KINDS", "AnalysisInputError", "Report", "Thresholds", "analyze", "attention_received"]
