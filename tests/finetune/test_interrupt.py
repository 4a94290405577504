"""Interrupted training: SIGTERM saves a checkpoint and exits; SIGKILL loses at most the steps since the last
checkpoint; either way `--resume` reaches exactly the losses of an uninterrupted run. Plus the dry run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
DATA = f"[{ROOT}/tests/fixtures/messages.jsonl, {ROOT}/tests/fixtures/alpaca.json]"


def _args(model: Path, out: Path) -> list[str]:
    return [str(BIN / "tunesmith"), "train", str(ROOT / "configs/quickstart.yaml"), f"base_model={model}",
            f"output_dir={out}", f"data.train={DATA}", "data.val_set_size=0", "data.max_length=64",
            "train.max_steps=60", "train.micro_batch_size=1", "train.precision=fp32", "train.save_every=5",
            "train.eval_every=0", "train.keep_checkpoints=3", "train.lr=1e-2", "lora.r=4"]


def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def _start_and_wait(args: list[str], out: Path, min_rows: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= min_rows:
            return p
        if p.poll() is not None:
            raise AssertionError(p.stderr.read()[-2000:])
        time.sleep(0.05)
    p.kill()
    raise AssertionError("training did not start in time")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> list[float]:
    out = tmp_path_factory.mktemp("ref") / "run"
    r = subprocess.run(_args(tiny_model_dir, out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return _losses(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_resumes_to_identical_losses(tiny_model_dir, tmp_path, reference, sig):
    out = tmp_path / "run"
    p = _start_and_wait(_args(tiny_model_dir, out), out, min_rows=12)
    p.send_signal(sig)
    p.wait(timeout=60)
    if sig == signal.SIGTERM:
        assert p.returncode == 143, p.stderr.read()[-2000:]
        assert "checkpoint saved" in p.stdout.read()
    else:
        assert p.returncode == -9
    assert not (out / "adapter").exists()  # never a final adapter from a run that did not finish
    steps = sorted(int(d.name[5:]) for d in (out / "checkpoints").glob("step-*") if (d / "state.pt").exists())
    assert steps and steps[-1] >= 10
    r = subprocess.run(_args(tiny_model_dir, out) + ["--resume"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _losses(out) == reference


def test_half_written_checkpoint_is_ignored(tmp_path):
    from tunesmith.finetune.runs import latest_checkpoint

    (tmp_path / "checkpoints" / "step-5").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-5" / "state.pt").write_bytes(b"x")
    (tmp_path / "checkpoints" / ".step-10.tmp123").mkdir()  # killed mid-save: never renamed into place
    (tmp_path / "checkpoints" / "step-15").mkdir()  # no state.pt: incomplete
    assert latest_checkpoint(tmp_path).name == "step-5"


def test_resume_refuses_a_changed_config(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = _args(tiny_model_dir, out)
    args[args.index("train.max_steps=60")] = "train.max_steps=6"
    assert subprocess.run(args, cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    r = subprocess.run(args + ["train.lr=5e-3", "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "train.lr: 0.01 -> 0.005" in r.stderr


def test_dry_run_prints_estimates_and_writes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    r = subprocess.run(_args(tiny_model_dir, out) + ["--dry-run"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "s/step measured" in r.stdout and "peak" in r.stdout and "trainable" in r.stdout
    assert not out.exists()


def test_dry_run_counts_full_finetuning_optimizer_state(tiny_model_dir, tmp_path):
    from tunesmith.finetune.config import load_config
    from tunesmith.finetune.estimate import dry_run

    args = _args(tiny_model_dir, tmp_path / "run")[3:]
    lora = dry_run(load_config(None, args))
    full = dry_run(load_config(None, [*args, "finetuning_type=full"]))
    assert "(LoRA)" in lora and "(full fine-tuning)" in full

    def adam(text: str) -> float:
        return float(text.split("+ ")[1].split(" MiB AdamW")[0].replace(",", ""))

    assert adam(full) > 10 * adam(lora)
