"""Safety nets of the loop: the loss check before step 1, fp16 loss scaling and overflow, signal handlers given back,
and a resume that would change the LR schedule refused."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.finetune.config import ConfigError, load_config
from tunesmith.finetune.errors import TrainingError
from tunesmith.finetune.trainer import fit, setup, train

ROOT = Path(__file__).parents[2]
DATA = f"[{ROOT}/tests/fixtures/messages.jsonl, {ROOT}/tests/fixtures/alpaca.json]"


def _cfg(model_dir, out, *extra):
    return load_config(None, [
        f"base_model={model_dir}", f"output_dir={out}", f"data.train={DATA}", "data.val_set_size=0",
        "data.max_length=64", "train.precision=fp32", "train.lr=1e-2", "train.max_steps=6", "train.micro_batch_size=2",
        "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0", "lora.r=4", "seed=0", *extra])


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_head_the_fused_loss_does_not_know_stops_the_run(tiny_model_dir, tmp_path, monkeypatch):
    """Simulate an architecture whose forward rescales its logits in a way `head_logits` does not reproduce: the run
    must stop before step 1 with both numbers, and `train.fused_loss=false` must train on the model's own loss."""
    import tunesmith.finetune.loss as loss_mod

    real = loss_mod.head_logits
    monkeypatch.setattr(loss_mod, "head_logits", lambda causal, h: real(causal, h) * 3.0)
    with pytest.raises(ConfigError, match=r"fused loss on the first batch is [\d.]+ but the model's own loss .* is "
                                          r"[\d.]+.*train.fused_loss=false"):
        setup(_cfg(tiny_model_dir, tmp_path / "a"))
    monkeypatch.setattr(loss_mod, "head_logits", real)
    exact = tmp_path / "exact"
    train(_cfg(tiny_model_dir, exact, "train.fused_loss=false"))
    fused = tmp_path / "fused"
    train(_cfg(tiny_model_dir, fused))
    assert _losses(exact) == pytest.approx(_losses(fused), rel=1e-4)  # two implementations, one loss


def test_fp16_scales_the_loss_and_resumes_exactly(tiny_model_dir, tmp_path):
    full = tmp_path / "full"
    extra = ("train.precision=fp16", "train.max_steps=10", "train.save_every=5", "train.keep_checkpoints=5")
    summary = train(_cfg(tiny_model_dir, full, *extra))
    assert summary["dtype"] == "torch.float16"
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    # the loss scale starts at 2**16: the first steps overflow and are skipped (no weight change), then it trains
    assert rows[0].get("skipped") and summary["fp16_skipped_steps"] >= 1
    assert not rows[-1].get("skipped") and rows[-1]["loss"] < rows[0]["loss"]
    state = torch.load(full / "checkpoints" / "step-5" / "state.pt", weights_only=False)
    assert state["scaler"]["scale"] < 2.0**16  # the lowered scale is part of the checkpoint
    part = tmp_path / "part"
    shutil.copytree(full / "checkpoints" / "step-5", part / "checkpoints" / "step-5")
    fit(setup(_cfg(tiny_model_dir, part, *extra), resume=True), resume=True)
    assert _losses(part)[-5:] == _losses(full)[-5:]
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (full, part))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_overflow_stops_with_a_message(tiny_model_dir, tmp_path):
    """Activations past fp16's largest value (65504) give an infinite loss: stop and say so, never train on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    big = tmp_path / "big"
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.mlp.down_proj.weight.mul_(1e8)  # fine in fp32, inf in fp16
    m.save_pretrained(big)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(big)
    with pytest.raises(TrainingError, match=r"step 1: .*fp16 overflowed.*train.precision=bf16"):
        train(_cfg(big, tmp_path / "r", "train.precision=fp16"))
    assert not (tmp_path / "r" / "adapter").exists()


def test_signal_handlers_are_given_back(tiny_model_dir, tmp_path):
    """After train() (finished or failed) Ctrl-C and SIGTERM do what they did before, e.g. in a notebook or the UI."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    train(_cfg(tiny_model_dir, tmp_path / "r", "train.max_steps=1"))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_resume_refuses_a_changed_schedule(tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    train(_cfg(tiny_model_dir, out, "train.max_steps=4", "train.save_every=2"))
    shutil.rmtree(out / "adapter")  # as if stopped after the step-2 checkpoint
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(ConfigError, match=r"run of 4 optimizer steps, but this config gives 8 .*train.max_steps=8"):
        fit(setup(_cfg(tiny_model_dir, out, "train.max_steps=8", "train.save_every=2"), resume=True), resume=True)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # also when fit raised
    # the same schedule resumes fine
    fit(setup(_cfg(tiny_model_dir, out, "train.max_steps=4", "train.save_every=2"), resume=True), resume=True)
    assert (out / "adapter").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_loss_chunks_match_the_models_own_loss_and_gradients(tiny_model_dir, dtype):
    """The frozen-head path takes each chunk's gradient in the forward pass (loss._HeadLoss); with chunks of 16 rows
    over ~100 trained positions, loss and LoRA gradients must equal those of the model's own forward."""
    from peft import LoraConfig, get_peft_model

    from tunesmith.finetune import loss
    from tunesmith.finetune.model import load_base_model

    torch.manual_seed(0)
    model = get_peft_model(load_base_model(str(tiny_model_dir)), LoraConfig(r=4, target_modules="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 at init would make every gradient but B's zero
    ids = torch.randint(3, model.config.vocab_size, (3, 48))
    targets = ids.roll(-1, 1)
    targets[:, :10] = -100  # prompt positions: not trained
    lm = loss.LossModel(model, chunk=16, autocast_dtype=dtype if dtype != torch.float32 else None)
    grads = []
    for reference in (False, True):
        model.zero_grad()
        value = lm(input_ids=ids, targets=targets, reference=reference)
        value.backward()
        grads.append((float(value.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (ours, g_ours), (theirs, g_theirs) = grads
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ours == pytest.approx(theirs, rel=tol)
    for n in g_ours:
        assert torch.allclose(g_ours[n], g_theirs[n], rtol=tol, atol=tol * float(g_theirs[n].abs().max())), n
