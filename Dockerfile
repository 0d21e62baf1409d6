# umtrain on a CUDA machine. Base: NVIDIA's PyTorch container (CUDA, NCCL, Transformer Engine, Apex included).
#   docker build -t umtrain .
#   docker run --gpus all --ipc=host -v $PWD/data:/workspace/umtrain/data umtrain \
#       torchrun --nproc-per-node 8 -m umtrain.cli.main train --config configs/paper/ultramem-151m-x12.yaml
ARG BASE=nvcr.io/nvidia/pytorch:25.01-py3
FROM ${BASE}
WORKDIR /workspace/umtrain
COPY pyproject.toml README.md ./
COPY umtrain ./umtrain
COPY configs ./configs
COPY launch ./launch
RUN pip install --no-cache-dir -e ".[hf]"
ENTRYPOINT []
CMD ["umtrain", "--help"]
