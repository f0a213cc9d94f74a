# tpblocks on CUDA GPUs (NCCL + real Triton kernels). Not buildable on the CPU-only development machines
# (no Docker engine there); the CPU path is what .ci/run installs and tests.
#
#   docker build -t tpblocks .
#   docker run --gpus all --ipc=host -v $PWD/outputs:/workspace/tpblocks/outputs tpblocks \
#       torchrun --nproc_per_node=8 launch/train.py +experiment=burger_8lane
#   docker run --gpus all --ipc=host -v $PWD/outputs:/workspace/tpblocks/outputs tpblocks \
#       python -m benchmarks.gpu --out outputs/gpu_check          # the one-GPU check (docs/gpu.md)
#
# Base: the official PyTorch image with the versions the GPU check targets (torch 2.11 + CUDA 13.0, whose wheel
# brings Triton 3.6), the same as the H200 machines' image. The code needs torch >= 2.4 (torch.library.custom_op);
# another CUDA base works: docker build --build-arg BASE=pytorch/pytorch:<version>-cuda<x.y>-cudnn9-devel .
ARG BASE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-devel
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WANDB_MODE=offline \
    TPBLOCKS_KERNELS=auto

RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends git build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/tpblocks
COPY pyproject.toml README.md ./
COPY tpblocks ./tpblocks
COPY kernels ./kernels
# Keep the image's CUDA torch (and the Triton it ships with): pin both so no dependency (deepspeed!) swaps them.
RUN python -c "import torch, triton; print(f'torch=={torch.__version__}\ntriton=={triton.__version__}')" \
        > /tmp/torch-constraint.txt \
    && pip install -c /tmp/torch-constraint.txt -e '.[hf,dev]' \
    && python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
COPY conf ./conf
COPY launch ./launch
COPY benchmarks ./benchmarks
COPY tests ./tests

CMD ["python", "launch/train.py"]
