"""Preference tuning and GRPO on two CPU processes (gloo) under `accelerate launch`: DPO on 2 ranks is the same run
as one process accumulating 2 micro-batches (losses and reward metrics averaged over ranks); KTO (its KL estimate
averaged over ranks) and GRPO (each prompt's group sampled on one rank) train and log their metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.finetune.config import load_config
from tunesmith.finetune.trainer import train

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
FIX = ROOT / "tests" / "fixtures"
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
COMMON = ["data.val_set_size=0", "data.max_length=64", "train.max_steps=4", "train.micro_batch_size=1",
          "train.precision=fp32", "train.save_every=0", "train.eval_every=0", "train.lr=2e-3", "train.warmup_steps=0",
          "lora.r=4", "seed=3"]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _launch(model: Path, out: Path, *extra: str, config: Path = ROOT / "configs/accelerate/cpu_2proc.yaml",
            entry: tuple[str, ...] = ("-m", "tunesmith.cli", "train")) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    args = [str(BIN / "accelerate"), "launch", "--config_file", str(config), "--main_process_port", "0", *entry,
            str(QUICKSTART), f"base_model={model}", f"output_dir={out}", *COMMON, "train.grad_accum=1", *extra]
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    return p.stdout


def test_dpo_ddp_equals_one_process_with_grad_accum(tiny_model_dir: Path, tmp_path: Path) -> None:
    dpo = ["method=dpo", f"data.train=[{FIX / 'pairs.jsonl'}]"]
    ref = tmp_path / "one"
    train(load_config(QUICKSTART, [f"base_model={tiny_model_dir}", f"output_dir={ref}", *COMMON, *dpo,
                                   "train.grad_accum=2"]))
    out = tmp_path / "ddp"
    _launch(tiny_model_dir, out, *dpo)
    keys = ("loss", "reward_margin", "reward_accuracy", "logp_chosen", "logp_rejected")
    for a, b in zip(_rows(ref), _rows(out), strict=True):
        assert [b[k] for k in keys] == pytest.approx([a[k] for k in keys], rel=1e-4, abs=1e-5)
    assert _rows(out)[0]["pairs"] == 2


@pytest.mark.slow
def test_kto_and_grpo_train_on_two_processes(tiny_model_dir: Path, tmp_path: Path) -> None:
    kto = tmp_path / "kto"
    _launch(tiny_model_dir, kto, "method=kto", f"data.train=[{FIX / 'kto.jsonl'}]", "train.micro_batch_size=2")
    assert all(r["kl"] >= 0 and r["answers"] == 4 for r in _rows(kto))

    grpo = tmp_path / "grpo"
    _launch(tiny_model_dir, grpo, "method=grpo", f"data.train=[{FIX / 'grpo.jsonl'}]", "grpo.num_generations=4",
            "grpo.max_new_tokens=4", "grpo.rewards=[{name: regex, pattern: '[aeiou]'}]")
    rows = _rows(grpo)
    assert len(rows) == 4 and rows[0]["completions"] == 8 and "reward_mean/regex(pattern=[aeiou])" in rows[0]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo"])
def test_pair_methods_under_fsdp2_equal_one_process(tiny_model_dir: Path, tmp_path: Path, method: str) -> None:
    """FSDP2 (the shipped fsdp.yaml settings) on 2 CPU ranks, with (DPO) the reference precomputed from the sharded
    model (unshard, forward with the adapter off, reshard) and evals in between: the same losses, rewards and eval
    preference accuracy as one process accumulating 2 micro-batches (ORPO's NLL over the step's chosen tokens of
    both ranks)."""
    import yaml

    launch_cfg = yaml.safe_load((ROOT / "configs/accelerate/fsdp.yaml").read_text()) | {"use_cpu": True}
    (tmp_path / "fsdp_cpu.yaml").write_text(yaml.safe_dump(launch_cfg))
    dpo = [f"method={method}", f"data.train=[{FIX / 'pairs.jsonl'}]", "data.val_set_size=2", "train.eval_every=2",
           *(["dpo.precompute_ref=true"] if method == "dpo" else [])]
    ref = tmp_path / "one"
    train(load_config(QUICKSTART, [f"base_model={tiny_model_dir}", f"output_dir={ref}", *COMMON, *dpo,
                                   "train.grad_accum=2"]))
    out = tmp_path / "fsdp"
    log = _launch(tiny_model_dir, out, *dpo, config=tmp_path / "fsdp_cpu.yaml",
                  entry=(str(ROOT / "tests/finetune/fsdp_cpu_entry.py"),))
    assert log.count("fsdp: ok FSDPPreferenceModel") == 2, log[-3000:]
    keys = ("loss", "reward_margin", "eval_loss", "eval_preference_accuracy")
    for a, b in zip(_rows(ref), _rows(out), strict=True):
        assert {k: b[k] for k in keys if k in a} == pytest.approx({k: a[k] for k in keys if k in a}, rel=1e-4,
                                                                  abs=1e-5)
