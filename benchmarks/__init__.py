"""Throughput benchmarks that print their numbers (``python -m densessl.benchmarks``, ``benchmarks.loader``,
``benchmarks.train_step``, ...); the latest results are in ``benchmarks/RESULTS.md``."""
