# tpblocks on CUDA GPUs (NCCL + real Triton kernels). Not buildable on the CPU-only development machines
# (no Docker engine there); the CPU path is what .ci/run installs and tests.
#
#   docker build -t tpblocks .
#   docker run --gpus all --ipc=host -v $PWD/outputs:/workspace/tpblocks/outputs tpblocks \
#       torchrun --nproc_per_node=8 launch/train.py +experiment=burger_8lane
ARG BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel
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
# Keep the image's CUDA torch: pin it so no dependency (deepspeed!) swaps it for another build.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-constraint.txt \
    && pip install -c /tmp/torch-constraint.txt -e '.[hf,dev]'
COPY conf ./conf
COPY launch ./launch
COPY benchmarks ./benchmarks
COPY tests ./tests

CMD ["python", "launch/train.py"]
