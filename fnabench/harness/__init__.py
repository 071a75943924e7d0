"""Spec parsing, registries, runner, measurement, results, leaderboards, regression checks, CLI."""
