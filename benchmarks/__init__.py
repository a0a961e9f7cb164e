"""Throughput and GPU benchmarks; run them as scripts (``make bench``)."""
