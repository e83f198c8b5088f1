"""Throughput benchmarks that print their numbers (``python -m benchmarks``, ``benchmarks.loader``,
``benchmarks.train_step``, ...); the latest results are in ``benchmarks/RESULTS.md``."""
