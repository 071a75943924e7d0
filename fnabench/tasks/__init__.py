"""Datasets and metrics; each task returns a dict of metrics."""
