"""Preference losses against hand-computed values (and TRL's own functions where they stand alone), per-sequence
log-probs against a plain forward, the reference as the adapter switched off, and toy training loops on the tiny
model: DPO margins grow, ORPO and SimPO learn without ever asking for a reference."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.finetune.data import IGNORE, Record
from tunesmith.finetune.pairs import collate_pairs, parse_record, tokenize_pair
from tunesmith.finetune.preference import (
    count_preferred,
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    precompute_reference_logps,
    reference_logps,
    selective_log_softmax,
    sequence_logps,
    simpo_loss,
    token_logps,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# -- losses on fixed log-probs -----------------------------------------------------------------------------------
PC, PR, RC, RR = _t(-1.0, -2.0), _t(-1.5, -1.0), _t(-1.2, -1.8), _t(-1.4, -1.3)
# h = (pc - rc) - (pr - rr) = [0.2 + 0.1, -0.2 - 0.3] = [0.3, -0.5]


def test_dpo_sigmoid_hand_value_and_metrics() -> None:
    loss, m = dpo_loss(PC, PR, RC, RR, beta=0.5)
    want = (-math.log(_sig(0.15)) - math.log(_sig(-0.25))) / 2
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert m["reward_margin"].item() == pytest.approx((0.15 - 0.25) / 2)
    assert m["reward_accuracy"].item() == 0.5
    assert m["reward_chosen"].item() == pytest.approx((0.1 - 0.1) / 2, abs=1e-12)
    assert m["reward_rejected"].item() == pytest.approx((-0.05 + 0.15) / 2)
    assert m["logp_chosen"].item() == pytest.approx(-1.5)


def test_dpo_label_smoothing_hinge_ipo_hand_values() -> None:
    eps = 0.1
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=eps)
    want = sum(-(1 - eps) * math.log(_sig(0.5 * h)) - eps * math.log(_sig(-0.5 * h)) for h in (0.3, -0.5)) / 2
    assert loss.item() == pytest.approx(want, abs=1e-12)
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="hinge")
    assert loss.item() == pytest.approx((0.85 + 1.25) / 2)
    nc, nr = _t(2, 4), _t(5, 1)
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo", chosen_tokens=nc, rejected_tokens=nr)
    hm = [0.2 / 2 - (-0.1) / 5, -0.2 / 4 - 0.3 / 1]
    assert loss.item() == pytest.approx(sum((h - 1.0) ** 2 for h in hm) / 2)
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(PC, PR, RC, RR, loss_type="ipo")
    with pytest.raises(ValueError, match="sigmoid only"):
        dpo_loss(PC, PR, RC, RR, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="sigmoid, ipo or hinge"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")


def test_orpo_hand_value() -> None:
    c, r, nll = _t(-0.5, -1.0), _t(-1.0, -0.7), torch.tensor(0.8, dtype=torch.float64)
    loss, m = orpo_loss(c, r, nll, beta=0.1)

    def log_odds(p: float) -> float:
        return p - math.log(1 - math.exp(p))

    ratios = [math.log(_sig(log_odds(a) - log_odds(b))) for a, b in ((-0.5, -1.0), (-1.0, -0.7))]
    assert loss.item() == pytest.approx(0.8 - 0.1 * sum(ratios) / 2, abs=1e-9)
    assert m["reward_accuracy"].item() == 0.5
    assert m["reward_margin"].item() == pytest.approx(0.1 * ((0.5) + (-0.3)) / 2)
    assert m["nll"].item() == pytest.approx(0.8)


def test_simpo_hand_value() -> None:
    c, r = _t(-0.5, -1.0), _t(-1.0, -0.7)
    loss, m = simpo_loss(c, r, beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx((-math.log(_sig(2 * 0.5 - 1)) - math.log(_sig(2 * -0.3 - 1))) / 2)
    assert m["reward_chosen"].item() == pytest.approx(-1.5)


def test_kto_hand_value_and_kl_estimate() -> None:
    pol, ref, labels = _t(-1.0, -2.0, -3.0), _t(-1.5, -1.5, -2.5), torch.tensor([True, False, True])
    kl = torch.tensor(0.2, dtype=torch.float64)
    loss, m = kto_loss(pol, ref, labels, kl, beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    # log-ratios [0.5, -0.5, -0.5]
    want = ((1 - _sig(0.5 * (0.5 - 0.2))) + 1.5 * (1 - _sig(0.5 * (0.2 + 0.5))) + (1 - _sig(0.5 * (-0.5 - 0.2)))) / 3
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert m["reward_chosen"].item() == pytest.approx(0.0, abs=1e-12)  # mean of 0.25 and -0.25
    assert m["reward_rejected"].item() == pytest.approx(-0.25)
    assert kto_kl_estimate(_t(-1, -2), _t(-1.5, -1.0)).item() == 0.0  # mean -0.25, clamped at 0
    assert kto_kl_estimate(_t(-1, -2), _t(-1.5, -2.5)).item() == pytest.approx(0.5)
    only_good, m = kto_loss(pol[:1], ref[:1], labels[:1], kl)
    assert math.isnan(m["reward_rejected"].item()) and math.isfinite(only_good.item())


def test_losses_match_trl(monkeypatch: pytest.MonkeyPatch) -> None:
    """ORPO and SimPO against TRL's own loss methods (the ones that stand alone; DPO/KTO are inside its trainers)."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    c, r = torch.tensor([-0.5, -1.0, -0.01]), torch.tensor([-1.0, -0.7, -2.0])
    acc = SimpleNamespace(device=torch.device("cpu"))
    losses, *_ = ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=0.1, accelerator=acc), c, r)
    ours, _ = orpo_loss(c, r, torch.tensor(0.0), beta=0.1)
    assert ours.item() == pytest.approx(-losses.mean().item(), abs=1e-6)  # TRL: loss = nll - losses.mean()
    fake = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.5, beta=2.0, label_smoothing=0.0,
                           accelerator=acc)
    losses, *_ = CPOTrainer.cpo_loss(fake, c, r)
    ours, _ = simpo_loss(c, r, beta=2.0, gamma=0.5)
    assert ours.item() == pytest.approx(losses.mean().item(), abs=1e-6)


def test_selective_log_softmax_is_log_softmax_gather() -> None:
    g = torch.Generator().manual_seed(0)
    logits, idx = torch.randn(5, 7, 50, generator=g), torch.randint(50, (5, 7), generator=g)
    want = torch.log_softmax(logits, -1).gather(-1, idx[..., None])[..., 0]
    torch.testing.assert_close(selective_log_softmax(logits, idx), want)
    trl_utils = pytest.importorskip("trl.trainer.utils")
    torch.testing.assert_close(selective_log_softmax(logits, idx), trl_utils.selective_log_softmax(logits, idx))


# -- on the tiny model -------------------------------------------------------------------------------------------
TOY = [
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Berlin is the capital of France."},
    {"prompt": "Two plus two?", "chosen": "four", "rejected": "The answer is 5."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}],
     "chosen": "Hello!", "rejected": [{"role": "assistant", "content": "I am fine, thank you."}]},
    {"prompt": "Which module decodes JSON?", "chosen": "json", "rejected": "The os module."},
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _lora(tiny_model_dir, seed: int = 0, attn: str = "sdpa"):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))


def _batch(tok, packed: bool = False, records=TOY, share: bool = False, capacity: int = 128):
    pairs = [tokenize_pair(parse_record(Record(f"toy.jsonl:{i + 1}", r), "dpo"), tok, tok.chat_template, 128)[0]
             for i, r in enumerate(records)]
    return collate_pairs(pairs, tok.pad_token_id, packed, capacity=capacity, share=share)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("packed", [False, True])
def test_shared_prompt_gives_each_sequence_its_whole_forward_logps_and_grads(tiny_model_dir, tok, attn: str,
                                                                             packed: bool) -> None:
    """data.share_prompt: one forward of each pair's prompt, each answer attending to it and never to the other
    answer, must be the two sequences forwarded alone: same sums and counts, same gradients, fewer tokens."""
    model = _lora(tiny_model_dir, attn=attn)
    with torch.no_grad():  # a trained-looking adapter, so every LoRA weight gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    whole, shared = _batch(tok, packed), _batch(tok, packed, share=True)
    assert shared["attention_mask"].dtype == torch.bool and shared["attention_mask"].dim() == 4
    assert (shared["input_ids"] != tok.pad_token_id).sum() < (whole["input_ids"] != tok.pad_token_id).sum()
    grads = []
    for batch in (whole, shared):
        model.zero_grad()
        sums, counts = sequence_logps(model, batch)
        (sums * torch.linspace(0.5, 1.5, len(sums))).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        if batch is whole:
            want = (sums.detach(), counts)
    torch.testing.assert_close(sums.detach(), want[0], rtol=1e-5, atol=1e-4)
    assert torch.equal(counts, want[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_shared_prompt_keeps_sequences_whole_when_the_group_outgrows_a_row(tok) -> None:
    """A pair whose prompt + both answers exceed the packing capacity is forwarded as two sequences; the rest share."""
    from tunesmith.finetune.pairs import shared_length

    pairs = [tokenize_pair(parse_record(Record(f"toy.jsonl:{i + 1}", r), "dpo"), tok, tok.chat_template, 128)[0]
             for i, r in enumerate(TOY)]
    k = shared_length([pairs[0].chosen, pairs[0].rejected])
    first = next(j for j, t in enumerate(pairs[0].chosen.targets) if t != IGNORE)
    assert 0 < k <= first and pairs[0].chosen.input_ids[:k] == pairs[0].rejected.input_ids[:k]
    longest = max(len(p.chosen.input_ids) + len(p.rejected.input_ids) - shared_length([p.chosen, p.rejected])
                  for p in pairs)
    capacity = longest - 1  # the longest group no longer fits one row
    batch = collate_pairs(pairs, tok.pad_token_id, True, capacity=capacity, share=True)
    assert batch["input_ids"].shape[1] <= capacity
    mask = batch["attention_mask"][:, 0]
    # a shared prompt is attended to by tokens of two different sequences; count the groups that still share
    seq_of = [[int(x) for x in row] for row in batch["sequence"]]
    shared_groups = sum(1 for r, row in enumerate(mask) for q in range(row.shape[0])
                        if batch["targets"][r, q] == IGNORE and batch["position_ids"][r, q] == 0
                        and len({seq_of[r][i] for i in range(row.shape[0]) if row[i, q] and seq_of[r][i] >= 0}) == 2)
    assert shared_groups == len(pairs) - 1


def test_sequence_logps_fused_packed_and_plain_forward_agree(tiny_model_dir, tok) -> None:
    model = _lora(tiny_model_dir)
    padded, packed = _batch(tok), _batch(tok, packed=True)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # 8 sequences packed into fewer rows
    with torch.no_grad():
        sums, counts = sequence_logps(model, padded)
        plain, _ = sequence_logps(model, padded, fused=False)
        small_chunks, _ = sequence_logps(model, padded, chunk=3)
        from_packed, packed_counts = sequence_logps(model, packed)
        # by hand: one sequence per forward, no padding, log_softmax over all logits
        manual = []
        for i in range(int(padded["n_seqs"])):
            n = int(padded["attention_mask"][i].sum())
            ids, tgt = padded["input_ids"][i, :n], padded["targets"][i, :n]
            lp = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)
            keep = tgt != IGNORE
            manual.append(lp[keep].gather(-1, tgt[keep][:, None]).sum())
    torch.testing.assert_close(sums, torch.stack(manual), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(plain, sums, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(small_chunks, sums, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(from_packed, sums, rtol=1e-5, atol=1e-4)
    assert torch.equal(counts, packed_counts) and (counts > 0).all()
    assert (sums < 0).all()


def test_dpo_loss_at_step_0_is_log2_with_reference_adapter_off(tiny_model_dir, tok) -> None:
    model = _lora(tiny_model_dir)
    batch = _batch(tok, packed=True)
    policy, _ = sequence_logps(model, batch)
    ref = reference_logps(model, batch)
    loss, m = dpo_loss(*policy.chunk(2), *ref.chunk(2), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # fresh LoRA (B = 0): policy == reference
    assert m["reward_margin"].item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
    # the reference really is the base weights: a non-zero adapter moves the policy, not the reference
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
        moved, _ = sequence_logps(model, batch)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        base_sums, _ = sequence_logps(base, batch)
    torch.testing.assert_close(reference_logps(model, batch), base_sums, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(moved, base_sums, atol=1e-2)
    assert torch.is_grad_enabled()
    with pytest.raises(ValueError, match="precompute"):
        reference_logps(base, batch)
    pre = precompute_reference_logps(model, [batch])
    torch.testing.assert_close(pre[0], base_sums, rtol=1e-5, atol=1e-4)


def _train(model, tok, step_loss, steps: int, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch, out = _batch(tok, packed=True), []
    for _ in range(steps):
        sums, counts = sequence_logps(model, batch)
        loss, m = step_loss(model, batch, sums, counts)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append((loss.item(), m))
    return out


def test_dpo_margins_grow_on_toy_pairs(tiny_model_dir, tok) -> None:
    model = _lora(tiny_model_dir)
    ref = precompute_reference_logps(model, [_batch(tok, packed=True)])[0]

    def step(model, batch, sums, counts):
        return dpo_loss(*sums.chunk(2), *ref.chunk(2), beta=0.1)

    assert count_preferred(model, [_batch(tok)], "dpo", [ref]) == (0, 4)  # policy == reference: no pair ranked
    hist = _train(model, tok, step, steps=6)
    first, last = hist[0][1], hist[-1][1]
    assert first["reward_margin"].item() == pytest.approx(0.0, abs=1e-6)
    assert last["reward_margin"].item() > 0.5
    assert last["reward_accuracy"].item() == 1.0
    assert hist[-1][0] < 0.7 * math.log(2)
    assert count_preferred(model, [_batch(tok)], "dpo", [ref]) == (4, 4)
    assert count_preferred(model, [_batch(tok)], "dpo") == (4, 4)  # reference with the adapter off: the same


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_orpo_and_simpo_learn_without_a_reference(tiny_model_dir, tok, method: str) -> None:
    model = _lora(tiny_model_dir)

    def no_reference():
        raise AssertionError(f"{method} asked for the reference model")

    model.disable_adapter = no_reference

    def step(model, batch, sums, counts):
        mean_c, mean_r = (sums / counts).chunk(2)
        if method == "orpo":
            n_c = counts.chunk(2)[0]
            return orpo_loss(mean_c, mean_r, -sums.chunk(2)[0].sum() / n_c.sum(), beta=0.1)
        return simpo_loss(mean_c, mean_r, beta=2.0, gamma=1.0)

    hist = _train(model, tok, step, steps=6)
    # ORPO's loss is mostly the chosen answers' NLL (~6 nats a token on a random model), so it falls slower
    assert hist[-1][0] < (0.9 if method == "orpo" else 0.5) * hist[0][0]
    assert hist[-1][1]["reward_margin"].item() > hist[0][1]["reward_margin"].item()
    assert count_preferred(model, [_batch(tok)], method)[0] >= 3
    if method == "orpo":
        assert hist[-1][1]["log_odds_ratio"].item() > hist[0][1]["log_odds_ratio"].item()


def test_token_logps_order_is_targets_row_major(tiny_model_dir, tok) -> None:
    """GRPO indexes per-token log-probs by `sequence[targets != IGNORE]`: both must be in the same order."""
    model = _lora(tiny_model_dir)
    batch = _batch(tok, packed=True)
    with torch.no_grad():
        lp = token_logps(model, batch)
        # use_cache=False as training runs: with a cache transformers ignores the packed positions (full causal mask)
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    keep = batch["targets"] != IGNORE
    want = torch.log_softmax(logits, -1)[keep].gather(-1, batch["targets"][keep][:, None])[:, 0]
    torch.testing.assert_close(lp, want, rtol=1e-5, atol=1e-4)


def test_kto_at_step_0_is_half_the_weights_and_learns(tiny_model_dir, tok) -> None:
    """Policy == reference at step 0: log-ratios and the KL estimate are 0, so each loss is weight * (1 - 1/2)."""
    from tunesmith.finetune.pairs import collate_sequences, mismatched, tokenize_unpaired

    rows = [{"prompt": "Capital of France?", "completion": "Paris.", "label": True},
            {"prompt": "Two plus two?", "completion": "The answer is 5.", "label": False},
            {"prompt": "Say hello.", "completion": "Hello!", "label": True}]
    items = [parse_record(Record(f"kto.jsonl:{i + 1}", r), "kto") for i, r in enumerate(rows)]
    batch = collate_sequences([tokenize_unpaired(u, tok, tok.chat_template, 64)[0] for u in items],
                              tok.pad_token_id, packed=True, capacity=64)
    kl_batch = collate_sequences([tokenize_unpaired(u, tok, tok.chat_template, 64)[0] for u in mismatched(items)],
                                 tok.pad_token_id, packed=True, capacity=64)
    labels = torch.tensor([r["label"] for r in rows])
    model = _lora(tiny_model_dir)
    ref, ref_kl = reference_logps(model, batch), reference_logps(model, kl_batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    hist = []
    for _ in range(5):
        with torch.no_grad():
            z = kto_kl_estimate(sequence_logps(model, kl_batch)[0], ref_kl)
        loss, m = kto_loss(sequence_logps(model, batch)[0], ref, labels, z, beta=0.1, desirable_weight=1.0,
                           undesirable_weight=2.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append((loss.item(), m))
    assert hist[0][0] == pytest.approx((0.5 + 2 * 0.5 + 0.5) / 3, abs=1e-6)
    assert hist[0][1]["kl"].item() == 0.0
    assert hist[-1][0] < hist[0][0]
    assert hist[-1][1]["reward_margin"].item() > 0
