"""Benchmarks (`make bench`, i.e. `python -m bench` from the project root). Speed is measured here, not in tests."""
