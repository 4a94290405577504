"""Two CPU processes (gloo) under `accelerate launch`: DDP is numerically the same run as one process accumulating
two micro-batches, and SIGTERM sent to the launcher checkpoints every rank, exits without a hang, and resumes exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.finetune.config import load_config
from tunesmith.finetune.trainer import train

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
DATA = f"[{ROOT}/tests/fixtures/messages.jsonl, {ROOT}/tests/fixtures/alpaca.json, {ROOT}/tests/fixtures/text.jsonl]"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
STEPS = 20
COMMON = [f"data.train={DATA}", "data.val_set_size=0", "data.max_length=64", f"train.max_steps={STEPS}",
          "train.micro_batch_size=1", "train.precision=fp32", "train.save_every=0", "train.eval_every=0",
          "train.lr=2e-3", "train.warmup_steps=0", "lora.r=4", "seed=3"]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _launch(model: Path, out: Path, *extra: str, config: Path = ROOT / "configs/accelerate/cpu_2proc.yaml",
            entry: tuple[str, ...] = ("-m", "tunesmith.cli", "train")) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    args = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "--main_process_port", "0", *entry,
            str(QUICKSTART), f"base_model={model}", f"output_dir={out}", *COMMON, "train.grad_accum=1", *extra]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_ddp_equals_one_process_with_grad_accum_and_sigterm_resumes(tiny_model_dir, tmp_path):
    # reference: one process, 2 micro-batches accumulated per step (the same examples per step as 2 ranks x 1)
    ref = tmp_path / "one"
    train(load_config(QUICKSTART, [f"base_model={tiny_model_dir}", f"output_dir={ref}", *COMMON, "train.grad_accum=2"]))

    # two ranks, SIGTERM to the launcher mid-run: every rank must stop at the same step with one checkpoint
    out = tmp_path / "ddp"
    p = _launch(tiny_model_dir, out)
    deadline = time.time() + 180
    while not ((out / "metrics.jsonl").exists() and len(_losses(out)) >= 5):
        assert p.poll() is None and time.time() < deadline, p.stdout.read()[-3000:] if p.stdout else ""
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    try:
        log = p.communicate(timeout=90)[0]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail("a rank hung after SIGTERM")
    assert "checkpoint saved" in log, log[-3000:]
    cks = sorted(int(d.name[5:]) for d in (out / "checkpoints").glob("step-*"))
    assert len(cks) == 1 and 5 <= cks[0] < STEPS, cks
    assert json.loads((out / "checkpoints" / f"step-{cks[0]}" / "trainer_state.json").read_text())["world_size"] == 2
    assert not (out / "adapter").exists()

    p = _launch(tiny_model_dir, out, "--resume")
    log = p.communicate(timeout=300)[0]
    assert p.returncode == 0, log[-3000:]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    # same per-step losses and weights as the single process: DDP averages what accumulation sums (the two differ
    # only in float summation order, which Adam amplifies over many steps at a high lr: hence 20 steps at 2e-3)
    assert _losses(out) == pytest.approx(_losses(ref), rel=1e-4, abs=1e-5)
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (ref, out))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    from tunesmith.finetune.generate import GenerationParams, load_generator

    c = load_generator(out).generate([{"role": "user", "content": "hi"}], GenerationParams(max_new_tokens=4))
    assert c.completion_tokens >= 1


@pytest.mark.slow
def test_fsdp2_saves_a_complete_adapter_and_resumes(tiny_model_dir, tmp_path):
    """FSDP2 with the shipped configs/accelerate/fsdp.yaml settings, on 2 CPU ranks: each rank holds half of every
    LoRA matrix, yet the adapter and the checkpoint hold whole ones, equal to one process's, and a resume from the
    checkpoint reaches the uninterrupted run exactly."""
    import yaml

    launch_cfg = yaml.safe_load((ROOT / "configs/accelerate/fsdp.yaml").read_text()) | {"use_cpu": True}
    (tmp_path / "fsdp_cpu.yaml").write_text(yaml.safe_dump(launch_cfg))
    fsdp = {"config": tmp_path / "fsdp_cpu.yaml", "entry": (str(ROOT / "tests/finetune/fsdp_cpu_entry.py"),)}
    steps = ("train.max_steps=8", "train.save_every=4")
    ref = tmp_path / "one"
    train(load_config(QUICKSTART, [f"base_model={tiny_model_dir}", f"output_dir={ref}", *COMMON, "train.grad_accum=2",
                                   *steps]))
    full = tmp_path / "fsdp"
    log = _launch(tiny_model_dir, full, *steps, **fsdp).communicate(timeout=300)[0]
    assert log.count("fsdp: ok FSDPLossModel\n") == 2, log[-3000:]  # both ranks ran FSDP2-wrapped
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (ref, full))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # whole matrices, not a rank's shard
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    assert _losses(full) == pytest.approx(_losses(ref), rel=1e-4, abs=1e-5)
    state = torch.load(full / "checkpoints" / "step-4" / "state.pt", weights_only=False)
    for name, w in state["weights"].items():  # the optimizer moments are whole too
        assert state["optimizer"]["state"][name]["exp_avg"].shape == w.shape

    part = tmp_path / "part"
    shutil.copytree(full / "checkpoints" / "step-4", part / "checkpoints" / "step-4")
    log = _launch(tiny_model_dir, part, *steps, "--resume", **fsdp).communicate(timeout=300)[0]
    assert "resumed from" in log, log[-3000:]
    c = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)
    assert _losses(part)[-4:] == _losses(full)[-4:]
