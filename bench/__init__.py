"""Benchmarks: `python -m bench.<name>`; each writes its JSON result under bench/results/."""
