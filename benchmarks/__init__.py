"""Benchmarks: ratios measured side by side in one run. Each prints a table; --json PATH writes the figures."""
