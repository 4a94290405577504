"""Label scoring (`Generator.score`): the summed log-prob of each candidate's trained tokens, computed with a shared
prompt KV cache, equals one full forward per (prompt, candidate) computed by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

PROMPTS = [
    [{"role": "user", "content": "Which category: a fast JSON parser?"}],
    [{"role": "system", "content": "Answer with one label."}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "A longer prompt so the batch is left-padded: " + "word " * 20}],
    [{"role": "user", "content": "few-shot: good?"}, {"role": "assistant", "content": "yes"},
     {"role": "user", "content": "and this one?"}],
]
LABELS = ["yes", "no", "maybe so", "positive", "pos"]


def manual_scores(model, tok, prompts, labels) -> torch.Tensor:
    """One full forward per pair, no cache, no padding: sum of log p(token) over the reply + end-of-turn tokens."""
    from tunesmith.finetune.data import tokenize_messages

    out = torch.zeros(len(prompts), len(labels), dtype=torch.float64)
    for i, p in enumerate(prompts):
        for j, lab in enumerate(labels):
            ids, train = tokenize_messages(list(p) + [{"role": "assistant", "content": lab}], tok, tok.chat_template,
                                           train_on_prompt=False)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            lp = torch.log_softmax(logits, -1)
            last = max(t for t in range(len(ids)) if train[t])  # the candidate reply: the last run of trained ids
            first = last
            while train[first - 1]:
                first -= 1
            out[i, j] = sum(lp[t - 1, ids[t]] for t in range(first, last + 1))
    return out


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_score_matches_manual(family: str, tmp_path: Path) -> None:
    from tunesmith.finetune.generate import load_generator
    from tunesmith.finetune.tiny import build_tiny_model

    gen = load_generator(build_tiny_model(tmp_path / family, family=family), dtype=torch.float32)
    got = torch.tensor(gen.score(PROMPTS, LABELS, max_rows=6), dtype=torch.float64)  # 1 prompt per batch, then 3
    want = manual_scores(gen.model, gen.tokenizer, PROMPTS, LABELS)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    got_batched = torch.tensor(gen.score(PROMPTS, LABELS), dtype=torch.float64)
    torch.testing.assert_close(got_batched, want, rtol=1e-4, atol=1e-4)
    assert (got < 0).all()
    # a prefix label is not favoured: "pos" and "positive" both end with the end-of-turn token
    assert not torch.equal(got[:, 3], got[:, 4])


def test_score_adapter_on_off(tiny_gen) -> None:
    tuned = torch.tensor(tiny_gen.score(PROMPTS[:1], LABELS))
    base = torch.tensor(tiny_gen.score(PROMPTS[:1], LABELS, use_adapter=False))
    assert not torch.allclose(tuned, base)
    with tiny_gen.model.disable_adapter():
        want = manual_scores(tiny_gen.model, tiny_gen.tokenizer, PROMPTS[:1], LABELS)
    torch.testing.assert_close(base.double(), want, rtol=1e-4, atol=1e-4)
