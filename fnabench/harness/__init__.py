"""Registries, sweep configs, runner, records, leaderboards, regression checks, CLI."""
