"""Kernel microbenchmarks (Triton vs torch eager vs torch.compile); ``python -m benchmarks.kernels``."""
