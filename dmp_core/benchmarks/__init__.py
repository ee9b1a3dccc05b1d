"""Benchmarks behind ``dmp bench``: each returns a dict printed as one JSON line.
Measured figures are recorded in ``bench/README.md``."""
