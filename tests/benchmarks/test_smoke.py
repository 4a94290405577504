"""The benchmark scripts run end to end in `--tiny` mode and print their tables (numbers are not checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", *args], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p.stdout


def test_train_bench_tiny_prints_table():
    out = _run("train_bench.py")
    assert "tokens/s" in out and "held-out loss" in out
    assert "tunesmith " in out and "-+-" in out


def test_train_bench_seeds_on_permuted_files_and_file_order_experiment():
    out = _run("train_bench.py", "--configs", "tunesmith,tunesmith-fileorder", "--seeds", "1,2", "--permute")
    assert "training file permuted per seed" in out and "tunesmith-fileorder" in out
    assert " +- " in out  # loss mean +- sd over the two seeds


def test_chat_bench_tiny_prints_tables():
    out = _run("chat_bench.py")
    assert "TTFT ms" in out and "vs pipeline" in out
    assert "tunesmith Generator.stream" in out and "tunesmith Generator.batch" in out


def test_api_latency_tiny_prints_table():
    out = _run("api_latency.py")
    assert "whole / streamed" in out
    assert "| tunesmith | idle |" in out and "| spin | busy |" in out


def test_gguf_bench_tiny_prints_table():
    import pytest

    pytest.importorskip("xllamacpp", reason="the GGUF benchmark needs the xllamacpp wheel")
    out = _run("gguf_bench.py", "--quants", "f16,q8_0")
    assert "generate: raw" in out and "stream: raw" in out and "q8_0" in out
