"""One prepared GPU check: ceilings, Triton kernels (correctness and speed), decode and bf16 training on one GPU.

    python -m benchmarks.gpu --out DIR            # on one CUDA GPU, <= 8 minutes (--budget-s, default 450)
    python -m benchmarks.gpu --dry-run --out DIR  # the same code paths on CPU at tiny sizes (Triton interpreter)

Sections (each guarded: a failure is recorded and the run goes on; the time budget skips what no longer fits):
  ceilings            device-to-device copy GB/s and a large bf16 matmul TFLOP/s, measured here   (ceilings.py)
  kernel_correctness  every Triton op vs its reference, fp32/fp16/bf16, fresh inputs, poisoned outputs,
                      every gradient; torch.library.opcheck                                    (kernel_check.py)
  comm                NCCL (gloo on a dry run) on one rank: kernels/comm.py's async and symmetric-memory
                      delayed all-reduce give the right sum, and their one-GPU latency   (comm_check.py)
  kernel_speed        Triton vs torch eager vs torch.compile at the 1.5B lane shapes            (kernel_speed.py)
  decode              CUDA-graph and compiled decode us/token vs the HBM roofline; perfmodel's 8-GPU
                      speed-up from the measured per-GPU times                                       (decode.py)
  training            bf16 step tokens/s and MFU, Llama 135M vs matched Burger / Sandwich            (train.py)

Writes DIR/gpu_check.json (every figure, written after each section) and DIR/gpu_check.md (the summary table),
and prints the summary table last. See docs/gpu.md.
"""
