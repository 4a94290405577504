#!/usr/bin/env bash
# Issue 15 item 3 in one call of the GPU machine (no network there): LoRA / QLoRA training tokens/s and peak GPU
# memory, tunesmith vs TRL SFTTrainer (and TRL + Liger), on random-init models of real shapes, then chat decoding.
#
#   here:  bash benchmarks/gpu_prep.sh            # fills .gpu/ (wheels, tunesmith, tokenizer), ~32 MB
#   there: bash benchmarks/gpu.sh                 # device run, carry [".gpu"], timeout_s 600
#   there, with ~5 minutes of device time left:  QUICK=1 GPU_BUDGET_S=245 bash benchmarks/gpu.sh
#   here, on a CPU, in seconds (what CI's smoke test runs):  TINY=1 bash benchmarks/gpu.sh
#
# Sections run in order of what the issue needs most, each only while time is left (GPU_BUDGET_S, default 540 s
# after the install); every table and JSON is written to $OUT as soon as it exists, so a call that runs out of
# time still brings back what finished.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
if [ -d .gpu/whl ] && [ -z "${TINY:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
END=$(( $(date +%s) + ${GPU_BUDGET_S:-540} ))
LOG="$OUT/gpu.log"
tiny=(); [ -n "${TINY:-}" ] && tiny=(--tiny)
tok=(); [ -d .gpu/tokenizer ] && tok=(--tokenizer .gpu/tokenizer)
mkdir -p /tmp/shapes

{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | head -3
  "$PY" - <<'PY'
import importlib.metadata as m
import time

import torch

names = ["torch", "transformers", "peft", "accelerate", "trl", "datasets", "liger-kernel", "bitsandbytes", "tunesmith"]
versions = []
for n in names:
    try:
        versions.append(f"{n}={m.version(n)}")
    except m.PackageNotFoundError:
        versions.append(f"{n}=-")
print(" ".join(versions))
if torch.cuda.is_available():  # the ceiling the tables are read against: one big bf16 matmul
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    print(f"bf16 8192^3 matmul: {10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12:.0f} TFLOP/s")
PY
} 2>&1 | tee -a "$LOG"

section() {  # section NAME NEEDS CAP COMMAND...: run if NEEDS seconds are left, for at most CAP of them
  local name=$1 need=$2 cap=$3 left
  shift 3
  left=$(( END - $(date +%s) ))
  if [ "$left" -lt "$need" ]; then
    echo "== $name: skipped, ${left} s left (needs ${need})" | tee -a "$LOG"
    return
  fi
  [ "$left" -gt "$cap" ] && left=$cap
  echo "== $name ($(date -u +%T), ${left} s for it): $*" | tee -a "$LOG"
  timeout -k 15 "$left" "$@" 2>&1 | grep --line-buffered -v -E "it/s\]|s/it\]|examples/s\]|^\s*$" | tee -a "$LOG"
}

train() {  # train NAME NEEDS CAP ARGS...: train_bench on a shape, each config in its own process, failures as rows
  local name=$1 need=$2 cap=$3 left
  shift 3
  left=$(( END - $(date +%s) ))
  [ "$left" -gt "$cap" ] && left=$cap
  section "train $name" "$need" "$cap" "$PY" benchmarks/train_bench.py "${tiny[@]}" "${tok[@]}" \
    --shape-dir /tmp/shapes --repeats 1 --keep-going --budget-s $(( left - (left < 150 ? left / 3 : 50) )) \
    --worker-timeout "$left" --eval-limit 30 --json "$OUT/train-$name.json" "$@"
}

# the compiled decode in a process of its own: a crash there (inductor) must not take the eager rows with it
chat() {
  section "chat llama-3.2-1b $1" 45 "$2" "$PY" benchmarks/chat_bench.py "${tiny[@]}" "${tok[@]}" --shape-dir /tmp/shapes \
    --shape llama-3.2-1b --only "$1" --keep-going --max-new-tokens 128 --repeats 1 --turns 3
}
# (the JSON of a section is rewritten after each config, so a section cut at its cap keeps the configs it finished)
if [ -n "${QUICK:-}" ]; then  # ~4 minutes, one model built once: what is left of a session's device time after a retry
  train llama-3.2-1b 60 120 --shape llama-3.2-1b --configs tunesmith,trl-packed,trl-liger --max-length 2048 --batch 4 \
    --steps 20
  train llama-3.2-1b-qlora 45 65 --shape llama-3.2-1b --qlora --configs tunesmith,trl-packed --max-length 2048 --batch 4 \
    --steps 20
  chat tunesmith,transformers 90
else  # (one engine per chat section: the first GPU run's two-engine section printed nothing in 70 s)
  train llama-3.2-1b 120 170 --shape llama-3.2-1b --configs tunesmith,trl-packed,trl-liger,tunesmith-compiled \
    --max-length 2048 --batch 4 --steps 30
  train qwen2.5-7b-qlora 150 200 --shape qwen2.5-7b --qlora --grad-ckpt --configs tunesmith,trl-packed,trl-liger \
    --max-length 2048 --batch 4 --steps 20
  chat tunesmith 55
  chat transformers 55
  chat tunesmith-compiled 60
  train qwen2.5-7b 100 600 --shape qwen2.5-7b --configs tunesmith,trl-packed --max-length 2048 --batch 2 --steps 20
fi
echo "== done $(date -u +%T)" | tee -a "$LOG"
