#!/usr/bin/env bash
# Fills .gpu/ (git-ignored) with what benchmarks/gpu.sh needs on the GPU machine, which reaches no network: the
# wheels its image lacks or has in other versions (the versions this checkout's .venv tests against, plus Liger and
# bitsandbytes), tunesmith itself as a wheel, and the embedded model's tokenizer. Run it here, then
#   device run: command `bash benchmarks/gpu.sh`, carry [".gpu"], timeout_s 600
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LIGER=${LIGER:-0.8.5}
BNB=${BNB:-0.50.2}
rm -rf .gpu && mkdir -p .gpu/whl .gpu/tokenizer
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pkgs=()
# transformers checks huggingface-hub's version at import and loads every model through `kernels`; hub 2.x talks through
# httpx2 (the image has hub 1.x and neither of the others)
for p in transformers peft accelerate trl datasets dill multiprocess huggingface_hub httpx2 httpcore2 truststore kernels tomlkit; do pkgs+=("$p==$(ver $p)"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .gpu/whl "${pkgs[@]}" "liger-kernel==$LIGER" "bitsandbytes==$BNB"
# bitsandbytes ships a library per CUDA version (43 MB): keep CUDA 13's (the GPU image's torch is cu130) and the CPU
# one, so everything carried stays under the device tool's 64 MiB
whl=$(ls .gpu/whl/bitsandbytes-*.whl)
tmp=$(mktemp -d)
(cd "$tmp" && unzip -q "$OLDPWD/$whl" && find . -name 'libbitsandbytes_*.so' ! -name '*cuda13*' ! -name '*_cpu.so' -delete \
  && sed -i '/libbitsandbytes_.*\.so/{/cuda13\|_cpu\.so/!d}' ./*.dist-info/RECORD \
  && rm "$OLDPWD/$whl" && zip -q -r "$OLDPWD/$whl" .)
rm -rf "$tmp"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .gpu/whl . >/dev/null
"$PY" - <<'PY'
from tunesmith.finetune import load_tokenizer
load_tokenizer("embedded").save_pretrained(".gpu/tokenizer")
PY
du -sh .gpu
