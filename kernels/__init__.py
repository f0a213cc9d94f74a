"""Triton kernels for lane-local layers and delayed-communication reception, each with a pure-torch reference.

Modules (one kernel each; kernel + launcher + torch custom op + reference):
  rms_norm          RMSNorm, forward and backward, per-lane weights in one launch
  swiglu            silu(g)*u, and the Burger down-projection that writes only each lane's own slice
  decode_attention  one-token GQA attention over the KV cache, RoPE on q, flash-decoding split + reduce
  reception         delayed reception x + gate * rmsnorm(mean of the other lanes) in one pass
  comm              delayed all-reduce on GPUs: async NCCL, symmetric-memory one-shot for small messages
  dispatch          "auto" | "triton" | "reference" (env TPBLOCKS_KERNELS, ``dispatch.set_mode``)
  ops               the entry points the models call

On a CPU-only machine the reference runs; Triton runs there only under ``TRITON_INTERPRET=1`` (correctness).
See docs/kernels.md.
"""
