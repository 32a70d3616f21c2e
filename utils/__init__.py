"""Shared helpers: CLI flags, run records, atomic writes, metrics, errors."""
