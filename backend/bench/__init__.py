"""Benchmarks: speed tables, the Race against other engines, curves, start-up time, first answers."""
