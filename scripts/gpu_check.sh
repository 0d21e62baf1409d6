#!/usr/bin/env bash
# What only a GPU can check, in one pass (a few minutes on one H100/H200): the CUDA tests (Triton lookup-reduce,
# side-stream overlap, single-GPU training vs CPU, decoding and `umtrain generate` on the GPU), then the GPU
# benchmarks (lookup-reduce, selection kernels, memory-layer profile, overlap, number-wise host sync, decode speed,
# training MFU).
# Each step runs even if an earlier one failed; logs and JSON go to $OUT (default runs/gpu_check). Exit status:
# the number of failed steps.
#   bash scripts/gpu_check.sh [tests] [lookup_reduce] [selection] [profile] [overlap] [host_sync] [decode] [train]
# (default: all) with umtrain installed, or PYTHONPATH pointing at it and megatron-core.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
failed=0
steps=" ${*:-tests lookup_reduce selection profile overlap host_sync decode train} "

step() {  # step NAME TIMEOUT_S COMMAND...   (runs when NAME, or its prefix before '_', was asked for)
    local name=$1 limit=$2; shift 2
    [[ $steps == *" $name "* || $steps == *" ${name%%_*} "* ]] || return 0
    echo "=== $name ($(date -u +%H:%M:%S))"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"   # a pipeline: its log is whole when it ends
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
step tests 300 python -m pytest -q -p no:cacheprovider tests/ops tests/parallel/test_overlap.py \
    tests/train/test_cuda_training.py tests/train/test_optimizer.py tests/model/memory/test_memory_layer.py \
    tests/model/test_reference_decode.py tests/cli/test_generate_command.py
step lookup_reduce 80 python benchmarks/lookup_reduce_cuda.py --out "$OUT/lookup_reduce_cuda.json"
step selection 90 python benchmarks/selection_cuda.py --out "$OUT/selection_cuda.json"
step selection_2200 90 python benchmarks/selection_cuda.py --keys 2200 --out "$OUT/selection_cuda_2200.json"
step profile 90 python benchmarks/memory_layer_profile.py --out "$OUT/memory_layer_profile.json"
step overlap 110 python benchmarks/memory_overlap.py --preset gpu --out "$OUT/memory_overlap_gpu.json"
step overlap_mbs16 110 python benchmarks/memory_overlap.py --preset gpu --micro-batch-size 16 --steps 20 \
    --out "$OUT/memory_overlap_gpu_mbs16.json"
gpus=$(python -c "import torch; print(torch.cuda.device_count())")   # the visible ones
if [ "$gpus" -ge 2 ]; then   # P = every GPU: the all-to-alls the side stream is meant to hide (issue 7's target)
    step overlap_multi 200 python benchmarks/memory_overlap.py --preset gpu --world-size "$gpus" \
        --micro-batch-size 16 --steps 20 --out "$OUT/memory_overlap_gpu_p$gpus.json"
fi
step host_sync 120 python benchmarks/memory_host_sync.py --warmup 5 --rounds 20 --out "$OUT/memory_host_sync.json"
step decode 180 python benchmarks/decode.py --batch-sizes 1,16,64,256 --out "$OUT/decode.json"
for model in dense-680m dense-151m ultramem-151m-x12; do
    step "train_$model" 150 python -m umtrain.cli.main train --config "configs/paper/$model.yaml" \
        training.train_iters=20 training.micro_batch_size=4 training.global_batch_size=8 logging.log_interval=5 \
        logging.progress_bar=false
done
echo "failed steps: $failed"
exit "$failed"
