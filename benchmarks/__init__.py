"""Benchmarks: each module exposes `run(...) -> dict` and a `python -m benchmarks.<name>` entry point."""
