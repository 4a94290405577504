"""The shipped preference / GRPO example data (examples/data/build_pairs.py): the builder is deterministic, every
record parses as what DPO and GRPO train on, the rejected side is wrong and the answer right for the exact-match
reward, and the test files ask nothing that any train file (the SFT data included) asks."""

from __future__ import annotations

import importlib.util
import json
import platform
import re
import sys
from pathlib import Path

import pytest

from tunesmith.finetune.data import load_records
from tunesmith.finetune.pairs import Pair, PromptRecord, parse_record
from tunesmith.finetune.rewards import exact_match

DATA = Path(__file__).parents[2] / "examples" / "data"
FILES = ("pairs_train.jsonl", "pairs_test.jsonl", "grpo_train.jsonl", "grpo_test.jsonl")


def _builder():
    spec = importlib.util.spec_from_file_location("build_pairs", DATA / "build_pairs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_builder_is_deterministic(tmp_path):
    build = _builder().build
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert build(a) == build(b)
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # the constants come from the running interpreter: on the one the files were built with, they are these files
    if sys.version_info[:3] == (3, 11, 7) and platform.system() == "Linux":
        for name in FILES:
            assert (a / name).read_bytes() == (DATA / name).read_bytes(), f"{name}: rerun build_pairs.py"


@pytest.mark.parametrize(("name", "method", "low", "high"), [
    ("pairs_train.jsonl", "dpo", 300, 500), ("pairs_test.jsonl", "dpo", 100, 200),
    ("grpo_train.jsonl", "grpo", 300, 500), ("grpo_test.jsonl", "grpo", 100, 200)])
def test_records_parse_as_the_method_trains_on(name, method, low, high):
    records = load_records([str(DATA / name)])
    assert low <= len(records) <= high
    parsed = [parse_record(r, method) for r in records]
    if method == "dpo":
        assert all(isinstance(p, Pair) for p in parsed)
        assert all(p.prompt[0]["role"] == "system" and p.prompt[-1]["role"] == "user" for p in parsed)
        # the right answer scores 1 with the exact-match reward, the plausible wrong one 0
        reward = exact_match("answer")
        chosen = [p.chosen[-1]["content"] for p in parsed]
        rejected = [p.rejected[-1]["content"] for p in parsed]
        assert reward(None, chosen, answer=chosen) == [1.0] * len(parsed)
        assert reward(None, rejected, answer=chosen) == [0.0] * len(parsed)
    else:
        assert all(isinstance(p, PromptRecord) and p.fields["answer"] for p in parsed)
        answers = [p.fields["answer"] for p in parsed]
        assert exact_match("answer")(None, [f"`{a}`." for a in answers], answer=answers) == [1.0] * len(parsed)


def test_wrong_module_does_not_define_the_name():
    for rec in map(json.loads, (DATA / "pairs_train.jsonl").read_text().splitlines()):
        if rec["task"] == "module":
            name = re.search(r"`(.+?)`", rec["prompt"][-1]["content"]).group(1)
            assert not hasattr(importlib.import_module(rec["rejected"]), name), rec


def test_test_questions_are_in_no_train_file():
    def names(path: Path) -> set[str]:  # the name a question is about: `X` or `module.X`
        return {re.search(r"`(.+?)`", line).group(1) for line in path.read_text().splitlines()}

    sft_train = names(DATA / "train.jsonl")
    for kind in ("pairs", "grpo"):
        test = names(DATA / f"{kind}_test.jsonl")
        assert not test & (names(DATA / f"{kind}_train.jsonl") | sft_train)
