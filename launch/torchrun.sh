#!/usr/bin/env bash
# One torchrun per node (srun starts this once per node): `launch/torchrun.sh --config CONFIG [key=value ...]`.
#
# Under SLURM the nodes, this node's rank and the first node (the rendezvous) come from SLURM's variables. Elsewhere
# set them on every node: NNODES, NODE_RANK (0 .. NNODES-1) and MASTER_ADDR (node 0's address); also MASTER_PORT
# (default 29500) and NPROC_PER_NODE (default: the GPUs nvidia-smi lists).
# SIGUSR1 (SLURM's pre-timeout signal) and SIGTERM go to the
# launcher (`python -m umtrain.checkpoint.launch`), which passes them on to the training workers; they checkpoint at
# the next step boundary and exit with umtrain's requeue code, and this script exits with that code (plain torchrun
# would turn it into 1). Needs training.exit_signal: SIGUSR1 (default).
set -uo pipefail

nproc=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
nproc=$(( nproc > 0 ? nproc : 1 ))
if [ -n "${SLURM_JOB_ID:-}" ]; then   # SLURM's own values win over any NNODES/NODE_RANK the job inherited
    nnodes=${SLURM_NNODES:-1}
    node_rank=${SLURM_NODEID:-0}
    master_addr=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)}
else
    nnodes=${NNODES:-1}
    node_rank=${NODE_RANK:-0}
    master_addr=${MASTER_ADDR:-}
    if [ "$nnodes" -gt 1 ] && [ -z "$master_addr" ]; then
        echo "launch/torchrun.sh: NNODES=$nnodes needs MASTER_ADDR (node 0's address) on every node" >&2
        exit 2
    fi
fi
master_addr=${master_addr:-127.0.0.1}
master_port=${MASTER_PORT:-29500}

python -m umtrain.checkpoint.launch \
    --nnodes "$nnodes" --node-rank "$node_rank" --nproc-per-node "$nproc" \
    --master-addr "$master_addr" --master-port "$master_port" \
    -m umtrain.cli.main train "$@" &
launcher=$!

forward() { kill "-$1" "$launcher" 2>/dev/null || true; }   # the launcher passes it on to its workers
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# `wait` returns early whenever a trapped signal arrives: wait again until the launcher itself has exited.
while true; do
    wait "$launcher"
    rc=$?
    kill -0 "$launcher" 2>/dev/null || break
done
exit "$rc"
