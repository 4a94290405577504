"""DPO, ORPO, SimPO and KTO through the real training loop on the tiny model: config checks, data errors naming
file:line, DPO's loss at step 0 is log 2, margins grow, ORPO / SimPO never ask for a reference, accumulation equals
one big batch, precomputed references equal on-the-fly ones, exact resume, and `tunesmith train / data preview /
eval` on preference pairs."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.finetune.config import ConfigError, load_config
from tunesmith.finetune.data import DataError
from tunesmith.finetune.trainer import fit, setup, train

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).parents[2]
FIX = ROOT / "tests" / "fixtures"


def _cfg(model_dir: Path, out: Path, method: str, *extra: str, data: str = "pairs.jsonl"):
    return load_config(None, [
        f"base_model={model_dir}", f"output_dir={out}", f"data.train=[{FIX / data}]", "data.val_set_size=0",
        "data.max_length=64", "train.precision=fp32", "train.lr=1e-2", "train.max_steps=4", "train.micro_batch_size=2",
        "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0", "lora.r=8", "lora.alpha=16", "train.log_every=1",
        "seed=0", f"method={method}", *extra])


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in _rows(out) if "loss" in r]


# -- config ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, match", [
    (["method=dpo", "dpo.loss_type=hinge", "dpo.label_smoothing=0.1"], "applies to loss_type=sigmoid only"),
    (["method=dpo", "dpo.label_smoothing=0.5"], r"must be in \[0, 0.5\)"),
    (["method=dpo", "finetuning_type=full"], "dpo.precompute_ref` must be true with finetuning_type=full"),
    (["method=kto", "finetuning_type=full"], "kto.precompute_ref` must be true"),
    (["dpo.beta=0.5"], "`dpo` is set but method is `sft`; set method: dpo"),
    (["method=orpo", "simpo.gamma=0.5"], "`simpo` is set but method is `orpo`"),
    (["method=grpo"], "`grpo.rewards` is empty"),
    (["method=grpo", "grpo.rewards=[json]", "grpo.num_generations=1"], "num_generations` must be >= 2"),
    (["method=grpo", "grpo.rewards=[nope]"], r"grpo.rewards\[0\]: unknown reward `nope`"),
    (["method=grpo", "grpo.rewards=[json]", "grpo.beta=0.1", "finetuning_type=full"], "grpo.beta` > 0 needs"),
    (["method=dpo", "dpo.betta=1"], "unknown key `dpo.betta`. Did you mean `dpo.beta`"),
    (["method=ppo"], "must be one of"),
])
def test_config_checks_name_the_key_and_fix(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_method_sections_load_with_their_defaults() -> None:
    cfg = load_config(None, ["method=grpo", "grpo.rewards=[json, {name: exact_match, field: answer}]"])
    assert cfg.grpo.num_generations == 8 and cfg.dpo.beta == 0.1 and cfg.simpo.beta == 2.0
    cfg = load_config(None, ["method=dpo", "dpo.loss_type=ipo", "dpo.beta=0.5", "dpo.precompute_ref=true"])
    assert (cfg.dpo.loss_type, cfg.dpo.beta, cfg.dpo.precompute_ref) == ("ipo", 0.5, True)


# -- data --------------------------------------------------------------------------------------------------------
def test_sft_given_pairs_says_which_method_to_set(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pairs.jsonl:1: .*set method: dpo"):
        setup(_cfg(tiny_model_dir, tmp_path / "r", "sft"))
    with pytest.raises(ConfigError, match=r"kto.jsonl:1: .*set method: kto"):
        setup(_cfg(tiny_model_dir, tmp_path / "r", "sft", data="kto.jsonl"))


@pytest.mark.parametrize("row, match", [
    ({"prompt": "hi", "chosen": "a"}, r"bad.jsonl:2: missing `rejected`"),
    ({"prompt": "hi", "chosen": "same", "rejected": "same "}, r"bad.jsonl:2: `chosen` and `rejected` are the same"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, r"bad.jsonl:2: `prompt` is missing or empty"),
    ({"prompt": "word " * 80, "chosen": "a", "rejected": "b"}, r"bad.jsonl:2: the prompt is \d+ tokens but "
                                                                 "data.max_length is 64"),
    ({"prompt": "hi", "completion": "a", "label": True}, r"bad.jsonl:2: method `dpo` trains on `prompt`, `chosen`"),
])
def test_bad_pair_records_name_file_and_line(tiny_model_dir: Path, tmp_path: Path, row: dict, match: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(row) + "\n")
    cfg = _cfg(tiny_model_dir, tmp_path / "r", "dpo", f"data.train=[{bad}]")
    with pytest.raises(DataError, match=match):
        setup(cfg)
    s = setup(_cfg(tiny_model_dir, tmp_path / "r", "dpo", f"data.train=[{bad}]", "data.on_bad_record=skip"))
    assert len(s.report.skipped) == 1 and sum(len(b) for b in s.batches) == 1


# -- training ----------------------------------------------------------------------------------------------------
def test_dpo_loss_at_step_0_is_log2_and_margins_grow(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A fresh adapter is the reference (B = 0), so every pair's margin is 0 and the loss log 2; then the chosen
    answers gain on the rejected ones. Pinned for seed 0, fp32."""
    out = tmp_path / "dpo"
    summary = train(_cfg(tiny_model_dir, out, "dpo", "train.max_steps=8", "train.micro_batch_size=8",
                         "train.scheduler=constant"))
    rows = _rows(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["reward_margin"] == 0.0 and rows[0]["pairs"] == 8
    for key in ("reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected", "logp_chosen",
                "logp_rejected"):
        assert key in rows[-1] and key in summary, key
    torch.testing.assert_close(torch.tensor(_losses(out)), torch.tensor(DPO_PINNED), rtol=2e-3, atol=2e-3)
    margins = [r["reward_margin"] for r in rows]
    assert margins == sorted(margins) and margins[-1] > 0.3 and rows[-1]["reward_accuracy"] >= 0.75
    assert summary["method"] == "dpo" and (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


DPO_PINNED = [0.69315, 0.65981, 0.63536, 0.61216, 0.58539, 0.56197, 0.55685, 0.54514]


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_orpo_and_simpo_train_without_a_reference(tiny_model_dir: Path, tmp_path: Path, method: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import tunesmith.finetune.methods as methods

    def no_reference(*a: object, **k: object) -> None:
        raise AssertionError(f"{method} asked for a reference")

    monkeypatch.setattr(methods, "reference_logps", no_reference)
    out = tmp_path / method
    train(_cfg(tiny_model_dir, out, method, "train.max_steps=6", "train.micro_batch_size=8", "train.scheduler=constant"))
    rows = _rows(out)
    assert rows[-1]["reward_margin"] > rows[0]["reward_margin"]
    assert _losses(out)[-1] < _losses(out)[0]
    if method == "orpo":
        assert {"nll", "log_odds_ratio", "log_odds_chosen"} <= set(rows[-1])


@pytest.mark.parametrize("method", ["dpo", "simpo"])
def test_shared_prompt_trains_like_whole_sequences(tiny_model_dir: Path, tmp_path: Path, method: str) -> None:
    """data.share_prompt (the default) forwards each pair's prompt once: the same losses and margins, step for
    step, as forwarding chosen and rejected whole."""
    from tunesmith.finetune.methods import can_share

    runs = {}
    for share in (True, False):
        cfg = _cfg(tiny_model_dir, tmp_path / str(share), method, f"data.share_prompt={share}",
                   "train.micro_batch_size=4", "train.eval_every=2", "data.val_set_size=4")
        s = setup(cfg)
        assert s.method.share is share and can_share(cfg, s.model) is share
        fit(s)
        runs[share] = _rows(tmp_path / str(share))
    for a, b in zip(runs[True], runs[False], strict=True):
        for key in ("loss", "reward_margin", "logp_chosen", "eval_loss", "eval_preference_accuracy"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("change, why", [
    ({"_attn_implementation": "flash_attention_2"}, "a kernel that takes no 4D mask"),
    ({"layer_types": ["full_attention", "linear_attention"]}, "a layer the mask does not reach"),
    ({"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 64}, "a window under 2 rows"),
])
def test_shared_prompt_is_declined_where_the_mask_would_not_hold(tiny_model_dir: Path, tmp_path: Path,
                                                                 change: dict, why: str) -> None:
    from transformers import AutoModelForCausalLM

    from tunesmith.finetune.methods import can_share

    cfg = _cfg(tiny_model_dir, tmp_path, "dpo")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert can_share(cfg, model)
    for k, v in change.items():
        setattr(model.config, k, v)
    assert not can_share(cfg, model), why


def test_a_model_that_ignores_the_shared_mask_is_caught_before_step_1(tiny_model_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """As an architecture whose layers ignore the 4D mask would: every answer sees the other. The step-0 check
    compares the shared forward with whole sequences and names the key that turns sharing off."""
    import tunesmith.finetune.pairs as pairs

    real = pairs._collate_shared

    def leaky(*a: object, **k: object) -> dict:
        batch = real(*a, **k)  # type: ignore[arg-type]
        w = batch["attention_mask"].shape[-1]
        batch["attention_mask"] = torch.ones(w, w, dtype=torch.bool).tril().expand_as(batch["attention_mask"])
        return batch

    monkeypatch.setattr(pairs, "_collate_shared", leaky)
    for fused in (True, False):  # also when training through the model's own forward
        with pytest.raises(ConfigError, match="data.share_prompt=false"):
            setup(_cfg(tiny_model_dir, tmp_path / str(fused), "dpo", f"train.fused_loss={fused}"))


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_grad_accumulation_equals_big_batch(tiny_model_dir: Path, tmp_path: Path, method: str) -> None:
    """2 accumulated micro-batches of 1 pair == 1 micro-batch of 2 pairs, gradient for gradient: losses are means
    over the step's pairs (ORPO's NLL over the step's chosen tokens), not over each micro-batch. (Gradients, not
    weights: Adam's update hides a scale error and magnifies float noise in near-zero gradients.)"""
    extra = ("data.packing=false", "train.max_steps=2")
    a = setup(_cfg(tiny_model_dir, tmp_path / "a", method, *extra, "train.micro_batch_size=1", "train.grad_accum=2"))
    b = setup(_cfg(tiny_model_dir, tmp_path / "b", method, *extra, "train.micro_batch_size=2"))
    b.batches = [a.batches[i] + a.batches[j] for i, j in a.plan]
    b.plan = [[k] for k in range(len(b.batches))]
    grads: dict[str, list[list[torch.Tensor]]] = {"a": [], "b": []}
    for name, s in (("a", a), ("b", b)):
        step = s.optimizer.step

        def record(*args: object, s: object = s, step: object = step, name: str = name, **kw: object) -> object:
            grads[name].append([p.grad.clone() for p in s.model.parameters() if p.requires_grad])
            return step(*args, **kw)

        s.optimizer.step = record
        fit(s)
    for ga, gb in zip(grads["a"], grads["b"], strict=True):
        for x, y in zip(ga, gb, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-3 * float(x.abs().max()))
    assert _losses(tmp_path / "a") == pytest.approx(_losses(tmp_path / "b"), rel=1e-5)
    ra, rb = _rows(tmp_path / "a")[-1], _rows(tmp_path / "b")[-1]
    assert ra["reward_margin"] == pytest.approx(rb["reward_margin"], abs=2e-5)


@pytest.mark.parametrize("method, data", [("dpo", "pairs.jsonl"), ("kto", "kto.jsonl")])
def test_precomputed_reference_equals_the_adapter_switched_off(tiny_model_dir: Path, tmp_path: Path, method: str,
                                                               data: str) -> None:
    train(_cfg(tiny_model_dir, tmp_path / "live", method, data=data))
    train(_cfg(tiny_model_dir, tmp_path / "pre", method, f"{method}.precompute_ref=true", data=data))
    assert _losses(tmp_path / "pre") == pytest.approx(_losses(tmp_path / "live"), abs=2e-5)


def test_kto_trains_with_its_kl_estimate(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "kto"
    train(_cfg(tiny_model_dir, out, "kto", "train.max_steps=6", "train.micro_batch_size=16",
               "train.scheduler=constant", data="kto.jsonl"))
    rows = _rows(out)
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-4)  # 1 - sigmoid(0) with w_d = w_u = 1: policy == reference
    assert all(r["kl"] >= 0 for r in rows) and rows[0]["answers"] == 16
    losses, margins = _losses(out), [r["reward_margin"] for r in rows]
    assert losses == sorted(losses, reverse=True) and margins == sorted(margins) and margins[-1] > 0.2


def test_full_finetune_dpo_precomputes_and_saves_the_reference(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "full"
    train(_cfg(tiny_model_dir, out, "dpo", "finetuning_type=full", "dpo.precompute_ref=true", "train.lr=1e-4",
               "train.max_steps=2"))
    assert _rows(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert (out / "reference_logps.pt").exists() and (out / "model" / "config.json").exists()


def test_dpo_eval_reports_preference_accuracy_and_resume_is_exact(tiny_model_dir: Path, tmp_path: Path) -> None:
    """4 steps straight == resume from the step-2 checkpoint (losses, metrics and final weights bit-equal); evals
    during training log eval_loss and eval_preference_accuracy."""
    extra = ("train.save_every=2", "train.keep_checkpoints=5", "lora.dropout=0.1", "data.val_set_size=2",
             "train.eval_every=2")
    full = tmp_path / "full"
    summary = train(_cfg(tiny_model_dir, full, "dpo", *extra))
    assert 0 <= summary["eval_preference_accuracy"] <= 1 and "eval_ppl" not in summary
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "checkpoints" / "step-2", part / "checkpoints" / "step-2")
    rows = (full / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("\n".join(rows[:3]) + "\n")
    fit(setup(_cfg(tiny_model_dir, part, "dpo", *extra), resume=True), resume=True)
    assert_same_run(full, part)


def assert_same_run(full: Path, part: Path) -> None:
    """A resumed run == the uninterrupted one: every metrics row (but timings) and the adapter, bit for bit."""

    def same(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rows]

    assert same(_rows(part)) == same(_rows(full))
    wa = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


def test_sweep_optimises_preference_accuracy(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tunesmith.finetune.sweep import sweep

    cfg = _cfg(tiny_model_dir, tmp_path / "r", "dpo", "data.val_set_size=2", "train.max_steps=2")
    res = sweep(cfg, trials=1, out=tmp_path / "sweep")
    assert res["metric"] == "eval_preference_accuracy" and 0 <= res["trials"][0]["eval_preference_accuracy"] <= 1
    with pytest.raises(ConfigError, match="method dpo logs eval_preference_accuracy and eval_loss"):
        sweep(cfg, trials=1, metric="eval_reward_mean", out=tmp_path / "sweep2")


# -- the command line --------------------------------------------------------------------------------------------
def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "tunesmith"), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)


def test_cli_train_dpo_preview_and_eval_pairs(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = _run(["train", str(ROOT / "configs" / "smollm2-135m_dpo.yaml"), f"base_model={tiny_model_dir}",
              f"output_dir={out}", f"data.train=[{FIX / 'pairs.jsonl'}]", f"data.validation=[{FIX / 'pairs.jsonl'}]",
              "train.max_steps=2", "train.micro_batch_size=2", "train.precision=fp32", "train.save_every=0",
              "train.eval_every=0"])
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(out)
    assert "reward_margin" in rows[0] and "eval_preference_accuracy" in rows[-1]
    r = _run(["data", "preview", str(FIX / "pairs.jsonl"), "--base-model", str(tiny_model_dir), "-n", "1"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.index("== chosen") < r.stdout.index("«Paris.<|im_end|>»") < r.stdout.index("== rejected") < \
        r.stdout.index("«Berlin.<|im_end|>»")
    r = _run(["eval", str(out), "--data", str(FIX / "pairs.jsonl")])
    assert r.returncode == 0 and "preference_accuracy" in r.stdout and "base" in r.stdout, r.stderr[-2000:]
    res = json.loads((out / "eval.json").read_text())
    assert res["records"] == 8 and {"preference_accuracy", "reward_accuracy"} <= set(res["models"]["tuned"])
    r = _run(["train", "quickstart", f"base_model={tiny_model_dir}", f"output_dir={tmp_path / 'sft'}",
              f"data.train=[{FIX / 'pairs.jsonl'}]"])
    assert r.returncode == 2 and "set method: dpo" in r.stderr and "Traceback" not in r.stderr
