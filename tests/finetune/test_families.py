"""The architecture matrix: for every tiny family in `tiny.FAMILIES`, through the real entry points, our training loss
is the model's own HF loss, a few LoRA steps lower it and leave the base bit-identical, a packed row is exactly its
examples run one by one, and the trained run generates and merges.

One short training run per (family, tokenizer) is shared by all its tests (module-scoped fixture).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tunesmith.finetune.config import load_config
from tunesmith.finetune.data import IGNORE, Example, collate, examples_in
from tunesmith.finetune.generate import GenerationParams, load_generator
from tunesmith.finetune.merge import merge_run
from tunesmith.finetune.tiny import FAMILIES, build_tiny_model
from tunesmith.finetune.trainer import Setup, fit, setup

ROOT = Path(__file__).parents[2]
DATA = f"[{ROOT}/tests/fixtures/messages.jsonl, {ROOT}/tests/fixtures/alpaca.json]"
CASES = [(f, "bpe") for f in FAMILIES] + [(f, "metaspace") for f in ("llama", "gemma2", "mistral")]


@dataclass
class Trained:
    s: Setup
    """The setup after `fit`: the trained PEFT model (LoRA B non-zero) and its loss model, in fp32."""
    base_before: dict[str, torch.Tensor]
    lora_before: dict[str, torch.Tensor]
    loss_before: float
    loss_after: float
    examples: list[Example]
    """Every training example (22 to 56 tokens with the BPE tokenizer: longer than the tiny sliding window of 8)."""


def _mean_loss(s: Setup) -> float:
    """Loss per trained token over all training batches: the same data before and after, whatever the step plan."""
    with torch.no_grad():
        total = sum(float(s.loss_model(**s.inputs(b))) for b in s.batches)
    return total / sum(ex.n_targets for b in s.batches for ex in examples_in(b))


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{k}" for f, k in CASES])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    family, kind = request.param
    root = tmp_path_factory.mktemp(f"{family}-{kind}")
    model_dir = build_tiny_model(root / "model", family=family, tokenizer=kind)
    cfg = load_config(None, [
        f"base_model={model_dir}", f"output_dir={root / 'run'}", f"data.train={DATA}", "data.val_set_size=0",
        "data.max_length=64", "train.precision=fp32", "train.lr=1e-2", "train.max_steps=6", "train.micro_batch_size=2",
        "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0", "lora.r=4", "lora.dropout=0", "seed=0"])
    s = setup(cfg)
    base_before = {n: p.detach().clone() for n, p in s.model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in s.model.named_parameters() if p.requires_grad}
    loss_before = _mean_loss(s)
    fit(s)
    s.loss_model.eval()
    examples = sorted((ex for b in s.batches for ex in examples_in(b)), key=lambda ex: ex.where)
    return Trained(s, base_before, lora_before, loss_before, _mean_loss(s), examples)


def _hf_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """`model(..., labels=...).loss`, the stock transformers loss, from our pre-shifted targets (HF shifts itself)."""
    t = inputs["targets"]
    labels = torch.cat([torch.full_like(t[:, :1], IGNORE), t[:, :-1]], dim=1)
    kw = {k: v for k, v in inputs.items() if k != "targets"}
    return model(**kw, labels=labels, use_cache=False).loss


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_loss_is_the_models_own_loss(trained: Trained, packed: bool) -> None:
    """Our fused head + CE == `model(labels=...)` in fp32 with the trained (non-zero) LoRA weights: softcapping,
    logit scales, tied or untied heads and MoE routing all included."""
    s, exs = trained.s, trained.examples
    assert any(p.abs().sum() > 0 for n, p in s.model.named_parameters() if "lora_B" in n)  # the adapter contributes
    group = [exs, exs[1:3]] if packed else exs  # packed: two rows, the second padded by a pad-only "example"
    inputs = collate(group, packed, s.tokenizer.pad_token_id)
    n_targets = int((inputs["targets"] != IGNORE).sum())
    with torch.no_grad():
        ours = s.loss_model(**inputs) / n_targets
        hf = _hf_loss(s.model, inputs)
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-6)


def test_lora_steps_lower_the_loss_and_base_stays_bit_identical(trained: Trained) -> None:
    after = dict(trained.s.model.named_parameters())
    assert trained.lora_before and all("lora_" in n for n in trained.lora_before)
    assert all(torch.equal(after[n], p) for n, p in trained.base_before.items())
    assert any(not torch.equal(after[n], p) for n, p in trained.lora_before.items() if "lora_B" in n)
    # MoE: LoRA reaches the fused expert weights too (peft's `all-linear` adds them as target_parameters)
    experts = [n for n in trained.lora_before if ".experts." in n and "lora_B" in n]
    assert bool(experts) == hasattr(trained.s.model.config, "num_experts_per_tok")
    assert all(not torch.equal(after[n], trained.lora_before[n]) for n in experts)
    # most families drop ~0.5 nats in 6 steps; Cohere (logit_scale 1/16) and Granite (logits / 4) only ~0.04-0.09:
    # the frozen final norm bounds |h|, so scaled-down logits of a random head can barely move off uniform
    assert trained.loss_after < trained.loss_before - 0.02, (trained.loss_before, trained.loss_after)


def test_packed_row_equals_separate_forwards(trained: Trained) -> None:
    """Packed rows (position_ids restarting per example, no attention_mask) must give every example exactly the
    logits and loss it gets alone: no attention across examples, sliding windows counted from each example's start."""
    s, exs = trained.s, trained.examples
    pad = s.tokenizer.pad_token_id
    rows = [exs, exs[1:3]]
    packed = collate(rows, True, pad)
    assert packed["input_ids"].shape[1] > max(len(ex.input_ids) for ex in exs)  # rows really hold several examples
    with torch.no_grad():
        logits = s.model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        for r, row in enumerate(rows):
            start = 0
            for ex in row:
                alone = collate([ex], False, pad)
                want = s.model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"],
                               use_cache=False).logits[0]
                got = logits[r, start: start + len(ex.input_ids)]
                where = f"row {r} {ex.where}"
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, where=where: f"{where}: {m}")
                start += len(ex.input_ids)
        ours_packed = s.loss_model(**packed)
        ours_alone = sum(s.loss_model(**collate([ex], False, pad)) for row in rows for ex in row)
    torch.testing.assert_close(ours_packed, ours_alone, rtol=1e-4, atol=1e-4)


def test_trained_run_generates(trained: Trained) -> None:
    gen = load_generator(trained.s.out)
    c = gen.generate([{"role": "user", "content": "hi"}], GenerationParams(max_new_tokens=4, temperature=0))
    assert 1 <= c.completion_tokens <= 4 and c.prompt_tokens > 0


def test_trained_run_merges(trained: Trained) -> None:
    out = merge_run(trained.s.out)
    assert (Path(out["path"]) / "config.json").exists()
    model_type = json.loads((Path(out["path"]) / "config.json").read_text())["model_type"]
    assert model_type == trained.s.model.config.model_type
