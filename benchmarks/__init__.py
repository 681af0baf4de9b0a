"""Benchmarks: Preble's workloads, arrival processes, a load generator, a cluster simulator and reports.

Entry point: the ``preble-bench`` console script (``benchmarks.cli:main``).
"""
