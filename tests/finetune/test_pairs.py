"""Preference / KTO / prompt-only records: detection, TRL's formats (explicit and implicit prompt), errors naming
file:line and the fix, trained tokens exactly the completion through end-of-turn, and one batch for both sides."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from tunesmith.finetune.data import IGNORE, DataError, DataReport, Example, Record, read_records
from tunesmith.finetune.pairs import (
    Pair,
    Unpaired,
    build_pair_examples,
    check_prompt_length,
    collate_pairs,
    collate_sequences,
    detect_kind,
    mismatched,
    parse_record,
    sampled_examples,
    tokenize_pair,
    tokenize_unpaired,
)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _rec(data: dict, where: str = "p.jsonl:1") -> Record:
    return Record(where, data)


def _trained(tok, ex: Example) -> str:
    return tok.decode([t for t in ex.targets if t != IGNORE])


def _jsonl(tmp_path: Path, rows: list[dict]) -> list[Record]:
    p = tmp_path / "prefs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return list(read_records(p))


# -- detection and parsing ---------------------------------------------------------------------------------------
def test_detect_kind_per_record() -> None:
    assert detect_kind(_rec({"prompt": "q", "chosen": "a", "rejected": "b"})) == "pair"
    assert detect_kind(_rec({"chosen": [], "rejected": []})) == "pair"
    assert detect_kind(_rec({"prompt": "q", "completion": "a", "label": True})) == "unpaired"
    assert detect_kind(_rec({"prompt": "q", "answer": "4"})) == "prompt"
    assert detect_kind(_rec({"prompt": "q", "completion": "a"})) == "sft"
    assert detect_kind(_rec({"messages": [{"role": "user", "content": "q"}]})) == "sft"
    with pytest.raises(DataError, match="p.jsonl:1: cannot tell the format"):
        detect_kind(_rec({"question": "q"}))


def test_explicit_pair_strings_and_messages() -> None:
    p = parse_record(_rec({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Berlin."}), "dpo")
    assert p == Pair([{"role": "user", "content": "Capital of France?"}], [{"role": "assistant", "content": "Paris."}],
                     [{"role": "assistant", "content": "Berlin."}], "p.jsonl:1")
    conv = parse_record(_rec({"prompt": [{"role": "user", "content": "hi"}],
                              "chosen": [{"role": "assistant", "content": "hello"}], "rejected": "go away"}),
                        "orpo", system_prompt="Be kind.")
    assert conv.prompt[0] == {"role": "system", "content": "Be kind."}
    assert conv.rejected == [{"role": "assistant", "content": "go away"}]


def test_implicit_prompt_is_the_shared_turns() -> None:
    user = {"role": "user", "content": "What color is the sky?"}
    p = parse_record(_rec({"chosen": [user, {"role": "assistant", "content": "Blue."}],
                           "rejected": [user, {"role": "assistant", "content": "Green."}]}), "simpo")
    assert p.prompt == [user]
    assert p.chosen == [{"role": "assistant", "content": "Blue."}]
    assert p.rejected == [{"role": "assistant", "content": "Green."}]


@pytest.mark.parametrize("row, match", [
    ({"prompt": "q", "chosen": "a"}, r"prefs.jsonl:2: missing `rejected`.*add the rejected answer"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, r"prefs.jsonl:2: `chosen` is empty. Write"),
    ({"prompt": "q", "chosen": [], "rejected": "b"}, r"prefs.jsonl:2: `chosen` is empty"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, r"prefs.jsonl:2: `prompt` is missing or empty"),
    ({"prompt": "q", "chosen": "Same answer", "rejected": " Same answer "}, r"prefs.jsonl:2: .*same answer.*Fix one"),
    ({"chosen": "Q: a", "rejected": "Q: b"}, r"prefs.jsonl:2: no `prompt`.*Add a `prompt` field"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "a"}]},
     r"prefs.jsonl:2: .*share no first turn"),
    ({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}]},
     r"prefs.jsonl:2: .*same conversation"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
      "rejected": "c"}, r"prefs.jsonl:2: `chosen` must end with a non-empty assistant turn"),
    ({"prompt": "q", "chosen": [{"role": "bot", "content": "a"}], "rejected": "c"},
     r"prefs.jsonl:2: `chosen\[0\]` must be an object with `role`"),
    ({"prompt": "q", "completion": "a", "label": True}, r"prefs.jsonl:2: method `dpo` trains on `prompt`, "
     r"`chosen` and `rejected`.*this record holds `prompt`, `completion` and `label"),
])
def test_bad_pairs_name_file_line_and_fix(tmp_path: Path, row: dict, match: str) -> None:
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    recs = _jsonl(tmp_path, [good, row])
    parse_record(recs[0], "dpo")
    with pytest.raises(DataError, match=match):
        parse_record(recs[1], "dpo")


def test_kto_and_prompt_records(tmp_path: Path) -> None:
    recs = _jsonl(tmp_path, [
        {"prompt": "q", "completion": "good", "label": True},
        {"prompt": "q", "completion": "bad", "label": "false"},  # as a CSV cell reads
        {"prompt": "q", "completion": "bad", "label": 2},
        {"prompt": "2+2?", "answer": "4", "level": 1},
        {"prompt": "q", "completion": "a"},
    ])
    assert parse_record(recs[0], "kto").label is True
    assert parse_record(recs[1], "kto").label is False
    with pytest.raises(DataError, match=r"prefs.jsonl:3: `label` must be true .* got 2"):
        parse_record(recs[2], "kto")
    pr = parse_record(recs[3], "grpo")
    assert pr.prompt == [{"role": "user", "content": "2+2?"}] and pr.fields == {"answer": "4", "level": 1}
    assert pr.where.endswith("prefs.jsonl:4")
    with pytest.raises(DataError, match=r"prefs.jsonl:5: method `kto` trains on .*label: true\|false"):
        parse_record(recs[4], "kto")
    with pytest.raises(DataError, match=r"prefs.jsonl:1: method `grpo` trains on `prompt` alone"):
        parse_record(recs[0], "grpo")


def test_mismatched_pairs_each_prompt_with_the_previous_completion() -> None:
    items = [Unpaired([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": f"a{i}"}], True,
                      f"f:{i}") for i in range(3)]
    out = mismatched(items)
    assert [(u.prompt[0]["content"], u.completion[0]["content"]) for u in out] == [("q0", "a2"), ("q1", "a0"),
                                                                                   ("q2", "a1")]


# -- tokens and masks --------------------------------------------------------------------------------------------
def test_trained_tokens_are_exactly_the_answer_through_end_of_turn(tok) -> None:
    pair = parse_record(_rec({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Berlin, surely."}),
                        "dpo")
    ex, cut = tokenize_pair(pair, tok, tok.chat_template, 128)
    assert cut == 0
    assert _trained(tok, ex.chosen) == "Paris.<|im_end|>"
    assert _trained(tok, ex.rejected) == "Berlin, surely.<|im_end|>"
    first = ex.chosen.targets.index(next(t for t in ex.chosen.targets if t != IGNORE))
    assert ex.chosen.input_ids[: first + 1] == ex.rejected.input_ids[: first + 1]  # one shared prompt
    assert tok.decode(ex.chosen.input_ids[: first + 1]).endswith("<|im_start|>assistant\n")


def test_only_the_completion_is_trained_not_assistant_turns_of_the_prompt(tok) -> None:
    few_shot = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "3+3?"}]
    pair = parse_record(_rec({"prompt": few_shot, "chosen": "6", "rejected": "7"}), "dpo")
    ex, _ = tokenize_pair(pair, tok, tok.chat_template, 128)
    assert _trained(tok, ex.chosen) == "6<|im_end|>"
    multi = parse_record(_rec({"prompt": "hi", "chosen": [
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "and?"},
        {"role": "assistant", "content": "Bye."}], "rejected": "no"}), "dpo")
    ex, _ = tokenize_pair(multi, tok, tok.chat_template, 128)
    assert _trained(tok, ex.chosen) == "Hello.<|im_end|>Bye.<|im_end|>"
    item = parse_record(_rec({"prompt": "q", "completion": "fine", "label": False}), "kto")
    assert _trained(tok, tokenize_unpaired(item, tok, tok.chat_template, 64)[0]) == "fine<|im_end|>"


def test_prompt_over_max_length_names_the_record_and_truncation_is_counted(tok, tmp_path: Path) -> None:
    long = "word " * 60
    recs = _jsonl(tmp_path, [{"prompt": "q", "chosen": "a " * 40, "rejected": "b"},
                             {"prompt": long, "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"prefs.jsonl:2: the prompt is \d+ tokens but data.max_length is 32.*"
                                        r"Raise data.max_length"):
        build_pair_examples(recs, tok, tok.chat_template, 32)
    report = DataReport()
    out = build_pair_examples(recs, tok, tok.chat_template, 32, report=report, skip_bad=True)
    assert len(out) == 1 and report.records == 2 and len(report.skipped) == 1
    assert report.truncated == 1 and report.tokens_cut > 0
    assert len(out[0].chosen.input_ids) == 32 and out[0].chosen.n_targets > 0
    with pytest.raises(DataError, match="chat template"):
        build_pair_examples(recs, tok, None, 32)


def test_sampled_answers_train_exactly_the_sampled_tokens(tok) -> None:
    """GRPO trains the ids the policy sampled, even a split re-tokenizing the text would not give (here "hello"
    letter by letter); an answer that ended trains its end-of-turn token, one cut by the length limit has none."""
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": "Greet."}], tokenize=False,
                                         add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    letters = [tok.convert_tokens_to_ids(ch) for ch in "hello"]
    assert tok(tok.decode(letters), add_special_tokens=False)["input_ids"] != letters  # not the canonical split
    done = SimpleNamespace(prompt_ids=prompt, token_ids=[*letters, tok.eos_token_id])
    cut = SimpleNamespace(prompt_ids=prompt, token_ids=letters[:3])
    a, b = sampled_examples([done, cut], 64, "p.jsonl:1")
    assert a.input_ids == prompt + done.token_ids and [t for t in a.targets if t != IGNORE] == done.token_ids
    assert _trained(tok, a) == "hello<|im_end|>" and _trained(tok, b) == "hel"
    with pytest.raises(DataError, match="p.jsonl:1"):
        sampled_examples([done], len(prompt), "p.jsonl:1")


# -- batches -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True])
def test_collate_pairs_maps_every_target_to_its_sequence(tok, packed: bool) -> None:
    rows = [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Berlin is the capital."},
            {"prompt": "2+2?", "chosen": "four", "rejected": "five, I think"},
            {"prompt": "Say hello.", "chosen": "Hello!", "rejected": "No."}]
    pairs = [tokenize_pair(parse_record(_rec(r), "dpo"), tok, tok.chat_template, 64)[0] for r in rows]
    batch = collate_pairs(pairs, tok.pad_token_id, packed, capacity=64)
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    assert int(batch["n_seqs"]) == 6
    assert ("position_ids" in batch) == packed and ("attention_mask" in batch) != packed
    if packed:
        assert batch["input_ids"].shape[0] < 6
    for i, ex in enumerate(seqs):
        got = batch["targets"][batch["sequence"] == i].tolist()
        assert got == [t for t in ex.targets if t != IGNORE]
    assert ((batch["sequence"] == -1) == (batch["targets"] == IGNORE)).all()
    # position ids restart at every sequence of a packed row
    if packed:
        starts = int((batch["position_ids"] == 0).sum())
        assert starts >= 6


def test_collate_sequences_padded_keeps_order(tok) -> None:
    a = Example([1, 2, 3], [2, 3, IGNORE])
    b = Example([4, 5], [IGNORE, IGNORE])
    batch = collate_sequences([a, b], 0, packed=False)
    assert batch["sequence"].tolist() == [[0, 0, -1], [-1, -1, -1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert torch.equal(batch["n_seqs"], torch.tensor(2))


def test_grpo_prompt_too_long_for_its_answers_names_the_record(tok, tmp_path: Path) -> None:
    recs = _jsonl(tmp_path, [{"prompt": "2+2?", "answer": "4"}, {"prompt": "word " * 30, "answer": "x"}])
    short = parse_record(recs[0], "grpo")
    n = check_prompt_length(short, tok, tok.chat_template, 64, 16)
    assert n == len(tok(tok.apply_chat_template(short.prompt, tokenize=False, add_generation_prompt=True))["input_ids"])
    with pytest.raises(DataError, match=r"prefs.jsonl:2: the prompt is \d+ tokens and answers may take 16 "
                                        r"\(grpo.max_new_tokens\), over data.max_length=64"):
        check_prompt_length(parse_record(recs[1], "grpo"), tok, tok.chat_template, 64, 16)
