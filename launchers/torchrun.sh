#!/usr/bin/env bash
# One node:  NPROC=8 launchers/torchrun.sh configs/llama_125m.yaml parallel.tp=2
# Node i of N (run on every node; the endpoint is node 0's address):
#   NNODES=2 NODE_RANK=i RDZV_ENDPOINT=node-0:29500 NPROC=8 launchers/torchrun.sh configs/llama_125m.yaml
set -euo pipefail
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NPROC=${NPROC:-1}
if [[ "${NNODES:-1}" -gt 1 ]]; then
    # every attempt of a --max-restarts job gets a store of its own (rank 0 hosts it): torchrun's
    # shared store keeps the dead attempt's keys, which Forge keys apart by each node's restart
    # count, and that count is not the same on every node when one node restarts for another's
    # failure (forge.train.distributed.elastic_attempt_store)
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
    exec torchrun --nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK}" --nproc-per-node "$NPROC" \
        --rdzv-backend c10d --rdzv-endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT host:port}" \
        --rdzv-id "${RDZV_ID:-forge}" -m forge train "$@"
fi
exec torchrun --standalone --nproc-per-node "$NPROC" -m forge train "$@"
