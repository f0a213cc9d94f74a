"""tpblocks: train, measure and serve parallel-lane transformer LLMs (Tensor Parallel Blocks)."""

__version__ = "0.1.0"
