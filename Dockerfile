# umtrain on a CUDA machine. Base: NVIDIA's PyTorch container (CUDA, NCCL, Transformer Engine, Apex, Triton included).
#   docker build -t umtrain .
#   docker run --gpus all --ipc=host -v $PWD/data:/workspace/umtrain/data umtrain \
#       torchrun --nproc-per-node 8 -m umtrain.cli.main train --config configs/paper/ultramem-151m-x12.yaml
#   docker run --gpus all --ipc=host umtrain bash scripts/gpu_check.sh     # the GPU checks and benchmarks
#
# The container's torch is NVIDIA's own build, versioned as a pre-release (e.g. 2.6.0a0+...), which pip does not
# count as satisfying `torch>=2.6`: a plain `pip install .` would replace it with a PyPI wheel (breaking Transformer
# Engine and Apex) or, where the image pins it (/etc/pip/constraint.txt), fail. So umtrain and megatron-core go in
# without their dependencies, and the other dependencies from pyproject.toml are installed on their own.
ARG BASE=nvcr.io/nvidia/pytorch:25.01-py3
FROM ${BASE}
WORKDIR /workspace/umtrain
COPY pyproject.toml README.md ./
COPY umtrain ./umtrain
COPY configs ./configs
COPY launch ./launch
COPY scripts ./scripts
COPY benchmarks ./benchmarks
COPY tests ./tests
RUN python -c "import tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = project['optional-dependencies']; \
print('\n'.join(d for d in project['dependencies'] + extras['hf'] + extras['dev'] \
if not d.startswith(('torch', 'megatron-core', 'triton'))))" > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && pip install --no-cache-dir --no-deps "megatron-core==0.16.1" \
 && pip install --no-cache-dir --no-deps -e . \
 && python -c "import torch, megatron.core, umtrain.cli.main; print('torch', torch.__version__)"
ENTRYPOINT []
CMD ["umtrain", "--help"]
