"""The benchmark scripts run end to end in `--tiny` mode and print their tables (numbers are not checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def _rows(table: str) -> dict[str, list[str]]:
    """The data rows of a printed `_table`, by their first cell."""
    lines = [ln for ln in table.splitlines() if " | " in ln]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in ln.split(" | ")] for ln in lines[1:])}


def test_chat_bench_tiny_prints_every_engine_in_both_tables():
    import importlib.util

    out = _run("chat_bench.py")
    head, _, batched = out.partition("\nBatched: 16 concurrent requests")
    assert "torch.get_num_threads()=" in head and "dtype=" in head and " UTC" in head and "machine: " in head
    engines = ["tunesmith", "tunesmith-int8", "tunesmith-compiled", "transformers"]
    if importlib.util.find_spec("xllamacpp"):
        engines.append("llama.cpp")  # the tiny model exported to a tiny f16 GGUF
    else:
        assert "note: llama.cpp: skipped: xllamacpp is not installed" in out
    batched, _, turns = batched.partition("\nA chat of 2 turns")
    single, many, chat = _rows(head.split("Single stream")[1]), _rows(batched), _rows(turns)
    assert list(single) == engines and list(many) == engines and list(chat) == engines, out
    assert single["transformers"][3] == "1.00x"  # decode tok/s vs HF of the HF row itself
    assert all(r[4].endswith("x") for r in many.values())  # batched / single-stream for every engine
    assert all(len(r[3].split()) == 2 and int(r[2]) > 0 for r in chat.values())  # TTFT of both turns, prompt tokens


def test_chat_bench_only_reruns_one_engine():
    out = _run("chat_bench.py", "--only", "tunesmith-int8", "--concurrency", "4")
    single = _rows(out.partition("Batched:")[0].split("Single stream")[1])
    assert list(single) == ["tunesmith-int8"] and single["tunesmith-int8"][3:5] == ["-", "-"], out
    assert list(_rows(out.partition("Batched:")[2].partition("\nA chat of")[0])) == ["tunesmith-int8"]


def test_api_latency_tiny_prints_table():
    out = _run("api_latency.py")
    assert "whole / streamed" in out
    assert "| tunesmith | idle |" in out and "| spin | busy |" in out


def test_gguf_bench_tiny_prints_table():
    pytest.importorskip("xllamacpp", reason="the GGUF benchmark needs the xllamacpp wheel")
    out = _run("gguf_bench.py", "--quants", "f16,q8_0")
    assert "generate: raw" in out and "stream: raw" in out and "q8_0" in out


def test_dpo_bench_tiny_prints_both_trainers_and_their_losses_per_step():
    pytest.importorskip("trl", reason="the DPO benchmark compares against TRL (pip install -e '.[bench]')")
    out = _run("dpo_bench.py")
    speed, _, per_step = out.partition("Loss per step")
    rows = _rows(speed)
    assert list(rows) == ["tunesmith", "tunesmith-whole", "trl"], out
    assert rows["trl"][2] == "1.00x" and rows["tunesmith"][2].endswith("x")  # tokens/s vs TRL
    forwarded = {k: int(r[3].replace(",", "")) for k, r in rows.items()}  # the shared prompt forwards fewer tokens
    assert forwarded["tunesmith"] < forwarded["tunesmith-whole"] <= forwarded["trl"], out
    assert all(float(r[-1]) > 0 for r in rows.values())  # final loss
    steps = _rows(per_step.split("\nnote:")[0])
    assert list(steps) == ["1", "2", "3"], out
    for tunesmith, whole, trl, _diff in steps.values():
        assert float(tunesmith) > 0 and float(whole) > 0 and float(trl) > 0
    # step 1: the adapter starts as a no-op, so the policy is the reference and every loss is log 2
    assert all(abs(float(x) - 0.6931) < 2e-4 for x in steps["1"][:3])
    assert "real tokens" in out


def test_int8_kernel_tiny_prints_every_row_count():
    out = _run("int8_kernel.py", "--rows", "1,3,16")
    rows = [ln for ln in out.splitlines() if ln[:2] in ("1 ", "3 ", "16")]
    assert len(rows) == 6 and "GFLOP/s" in out, out
    if "cannot run here" not in out:  # the kernel built: its answers match fp64 on the same int8 weights
        assert all(float(ln.rsplit("|", 1)[1]) < 1e-5 for ln in rows), out


def test_long_prompt_tiny_prints_a_row_per_chunk():
    out = _run("long_prompt.py", "--chunks", "0,16,64", "--streams", "3")
    rows = _rows(out)
    assert set(rows) == {"off", "16", "64"} and "streams' longest gap ms" in out
    assert all(len(cells) == 5 for cells in rows.values())


def _shapes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("shapes", ROOT / "benchmarks" / "shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shapes_have_their_checkpoints_parameter_counts():
    """The GPU tables are only about the real models if the random ones have their exact shapes."""
    shapes = _shapes()
    published = {"llama-3.2-1b": 1_235_814_400, "qwen2.5-7b": 7_615_616_512, "gemma-2-2b": 2_614_341_888}
    assert {name: shapes.parameters(name) for name in shapes.SHAPES} == published
    assert shapes.describe("qwen2.5-7b") == "qwen2.5-7b shape (random init, 7.62B parameters)"


def test_train_bench_tiny_shape_keeps_going_past_a_failed_config(tmp_path):
    """What the GPU run (benchmarks/gpu.sh) relies on: a shape's family trains, and a config that fails (Liger
    needs a GPU) becomes a row saying why while the others still run and reach the JSON."""
    import json


    pytest.importorskip("trl")
    out = _run("train_bench.py", "--shape", "gemma-2-2b", "--configs", "tunesmith,trl-liger,trl-packed",
               "--keep-going", "--shape-dir", str(tmp_path), "--json", str(tmp_path / "r.json"))
    assert "gemma-2-2b (tiny random model of its family)" in out
    rows = _rows(out)
    assert rows["tunesmith"][1] and rows["tunesmith"][1].endswith("x") and rows["trl-packed"][1] == "1.00x", out
    assert rows["trl-liger"][0].startswith("trl-liger failed (exit 1): "), out
    results = json.loads((tmp_path / "r.json").read_text())
    assert set(results) == {"tunesmith", "trl-liger", "trl-packed"} and "failed" in results["trl-liger"]
    assert json.loads((tmp_path / "gemma-2-2b" / "shape.json").read_text())["tiny"] is True


@pytest.mark.slow
def test_gpu_script_runs_every_section_tiny_on_a_cpu(tmp_path):
    """benchmarks/gpu.sh is what a lent GPU runs once, in minutes it cannot spare on a shell typo: its tiny CPU run
    goes through every section and writes every table."""
    env = {**os.environ, "TINY": "1", "OUT": str(tmp_path), "PY": sys.executable}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    log = (tmp_path / "gpu.log").read_text()
    for section in ("train llama-3.2-1b", "train qwen2.5-7b-qlora", "chat llama-3.2-1b", "train qwen2.5-7b ("):
        assert f"== {section}" in log, log[-3000:]
    assert "skipped" not in log and "== done" in log
    assert sorted(x.name for x in tmp_path.glob("*.json")) == [
        "train-llama-3.2-1b.json", "train-qwen2.5-7b-qlora.json", "train-qwen2.5-7b.json"]
    assert "QLoRA (lora.load_in_4bit: true) needs a CUDA GPU" in log  # a CPU's QLoRA rows fail, and say why
