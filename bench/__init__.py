"""Benchmarks: each script runs as `python -m bench.<name>` from the repository root and prints its figures as JSON last."""
