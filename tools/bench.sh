#!/usr/bin/env bash
# The reference CPU comparison of the issue: Forge vs Hugging Face transformers (LlamaForCausalLM,
# default sdpa attention, no torch.compile) on a Llama-style 12-layer, d=768, T=256 shape,
# vocab 32000, fp32, same batch / weights / AdamW. Extra arguments are passed on (e.g. --json,
# --linear aten, --dtype bf16, --device cuda). Several runs: the machine may be shared and noisy.
set -euo pipefail
RUNS=${RUNS:-1}
for i in $(seq "$RUNS"); do
  python -m forge bench --preset tiny-llama --layers 12 --d-model 768 --heads 12 --vocab 32000 \
    --seq-len 256 --batch 4 --steps 6 --warmup 2 --dtype fp32 --compile "$@"
done
