"""Benchmarks of the TiM4Rec codebase: speed and memory (benchmark.py), and helpers."""
