#!/usr/bin/env bash
# One node:    launchers/deepspeed.sh configs/llama_125m.yaml parallel.tp=2
# Many nodes:  HOSTFILE=launchers/hostfile launchers/deepspeed.sh configs/llama_125m.yaml parallel.tp=8 parallel.pp=2
# Runs `python -m forge train ARGS` on every GPU of every node in the hostfile.
set -euo pipefail
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [[ -n "${HOSTFILE:-}" ]]; then
    exec deepspeed --hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}" --module forge train "$@"
fi
exec deepspeed --num_gpus "${NUM_GPUS:-1}" --master_port "${MASTER_PORT:-29500}" --module forge train "$@"
