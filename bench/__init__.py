"""Benchmarks: figures as JSON, each beside a limit measured in the same run."""
